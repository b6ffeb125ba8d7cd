"""`python -m fastlayers summary --model resnet18 [--input-size 3 224 224]`: the model's
layers, their output shapes (from forward hooks on a zero input) and parameter counts."""
import argparse
import sys

import torch

from .models import DEFAULT_INPUT_SIZE, LAYER_CHOICES, MODELS, get_model

__all__ = ["summarize", "format_summary", "main"]


def _shape(out):
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, (tuple, list)):
        return [_shape(o) for o in out]
    return type(out).__name__


def summarize(model, input_size, batch_size=1, device="cpu", dtype=torch.float32):
    """Run one forward pass on zeros of shape [batch_size, *input_size] and return a
    list of rows (one per module, in call order, containers included):
    dict(name, type, depth, output_shape, params and trainable (the module's own),
    total_params (recursive), leaf). Layers that run fastlayers kernels have types
    "fastlayers.<Class>"."""
    rows, hooks, stack = [], [], []
    names = {m: n for n, m in model.named_modules()}

    def pre(module, inputs):  # a row per call, in call order (parents before children)
        name = names[module]
        own = list(module.parameters(recurse=False))
        row = {
            "name": name or "(model)",
            "type": _type_name(module),
            "depth": name.count(".") + 1 if name else 0,
            "output_shape": None,
            "params": sum(p.numel() for p in own),
            "trainable": sum(p.numel() for p in own if p.requires_grad),
            "total_params": sum(p.numel() for p in module.parameters()),
            "leaf": not any(True for _ in module.children()),
        }
        rows.append(row)
        stack.append(row)

    def hook(module, inputs, output):
        stack.pop()["output_shape"] = _shape(output)

    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(batch_size, *input_size, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def _type_name(module):
    mod = type(module).__module__
    if mod.startswith("fastlayers") and not mod.startswith("fastlayers.models"):
        return "fastlayers." + type(module).__name__   # one of our layers
    return type(module).__name__


def format_summary(model, rows, input_size, batch_size=1):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = []
    w = max(len("  " * r["depth"] + r["name"]) for r in rows)
    w = max(w, len("layer"))
    tw = max(len(r["type"]) for r in rows)
    lines.append(f"{'layer':<{w}}  {'type':<{tw}}  {'output shape':<22}  {'params':>12}")
    lines.append("-" * (w + tw + 40))
    for r in rows:
        if r["depth"] == 0:
            continue
        if r["leaf"]:
            params = f"{r['params']:,}" if r["params"] else ""
        else:  # containers: their total, in parentheses
            params = f"({r['total_params']:,})"
        lines.append(f"{'  ' * (r['depth'] - 1) + r['name']:<{w}}  {r['type']:<{tw}}  "
                     f"{str(r['output_shape']):<22}  {params:>12}")
    lines.append("-" * (w + tw + 40))
    out = next((r["output_shape"] for r in rows if r["depth"] == 0), None)
    lines.append(f"input {[batch_size, *input_size]} -> output {out}")
    lines.append(f"total parameters: {total:,}  trainable: {trainable:,}  "
                 f"non-trainable: {total - trainable:,}")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    lines.append(f"parameters + buffers: {size / 2**20:.2f} MiB")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastlayers summary",
                                description="Print a model's layers, output shapes and "
                                            "parameter counts.")
    p.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="input size (default: the model's design size, e.g. 1 28 28 for lenet5)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--layers", default="torch", choices=LAYER_CHOICES,
                   help="layer namespace (shapes and counts are the same for both)")
    p.add_argument("--small-input", action="store_true", default=None,
                   help="vgg/resnet: small-image variant (default: chosen from H)")
    args = p.parse_args(argv)
    size = tuple(args.input_size or DEFAULT_INPUT_SIZE[args.model])
    kw = dict(image_size=size[1])
    if args.small_input is not None and args.model.startswith(("vgg", "resnet")):
        kw["small_input"] = True
    model = get_model(args.model, num_classes=args.num_classes, in_channels=size[0],
                      layers=args.layers, **kw)
    rows = summarize(model, size, args.batch_size)
    print(f"{args.model} ({args.layers} layers)")
    print(format_summary(model, rows, size, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
