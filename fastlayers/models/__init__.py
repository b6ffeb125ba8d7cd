"""Classic image classifiers built from fastlayers' layers (or torch.nn's, for a twin).

    from fastlayers.models import get_model
    net = get_model("resnet18", num_classes=10, in_channels=3)             # fastlayers.nn
    twin = get_model("resnet18", num_classes=10, in_channels=3, layers="torch")
    twin.load_state_dict(net.state_dict())                                  # same keys

Every builder takes num_classes, in_channels, layers ("fastlayers" | "torch") and
image_size (the input's height; models that care use it: lenet5 sizes its first Linear,
vgg*/resnet* pick the small-image variant for images <= 64 px unless `small_input`
is given).
"""
import torch.nn as tnn

from ._layers import LAYER_CHOICES, fastlayers_available, fastlayers_status, get_layers
from .alexnet import AlexNet, AlexNetSmall, alexnet, alexnet_small
from .lenet import LeNet5, lenet5
from .resnet import BasicBlock, ResNet, resnet18, resnet34
from .vgg import VGG, vgg11, vgg11_bn, vgg16, vgg16_bn

MODELS = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "alexnet_small": alexnet_small,
    "vgg11": vgg11,
    "vgg11_bn": vgg11_bn,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "resnet18": resnet18,
    "resnet34": resnet34,
}

# The input each model was designed for (C, H, W), used by `summary` as its default.
DEFAULT_INPUT_SIZE = {
    "lenet5": (1, 28, 28),
    "alexnet": (3, 224, 224),
    "alexnet_small": (1, 28, 28),
    **{name: (3, 224, 224) for name in ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn",
                                        "resnet18", "resnet34")},
}

__all__ = ["MODELS", "DEFAULT_INPUT_SIZE", "LAYER_CHOICES", "get_model", "get_layers",
           "fastlayers_available", "fastlayers_status", "head_name", "replace_head", "freeze", "LeNet5", "AlexNet",
           "AlexNetSmall", "VGG", "ResNet", "BasicBlock"] + list(MODELS)


def get_model(name, num_classes=10, in_channels=1, layers="fastlayers", **kw):
    """Build model `name` (see MODELS) with the layer namespace `layers`."""
    try:
        build = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
    return build(num_classes=num_classes, in_channels=in_channels, layers=layers, **kw)


def head_name(model):
    """Qualified name of the classifier head: the model's last Linear."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, tnn.Linear):
            name = n
    if name is None:
        raise ValueError("model has no Linear layer to use as the classifier head")
    return name


def replace_head(model, num_classes):
    """Replace the last Linear with a freshly initialised one with `num_classes` outputs,
    of the same class (fastlayers or torch) and on the same device/dtype. Returns its name."""
    name = head_name(model)
    old = model.get_submodule(name)
    new = type(old)(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return name


def freeze(model, prefixes):
    """Set requires_grad=False on parameters whose name starts with one of `prefixes`
    (e.g. "features", or "conv1,bn1,layer1"). "backbone" freezes everything but the
    head. Returns the number of frozen parameter tensors.

    Frozen BatchNorm layers still update their running statistics in train() mode,
    as in torch; call .eval() on them to keep the loaded statistics."""
    if isinstance(prefixes, str):
        prefixes = [p.strip() for p in prefixes.split(",") if p.strip()]
    head = head_name(model) + "."
    n = 0
    for pname, p in model.named_parameters():
        hit = any(pname == pre or pname.startswith(pre + ".") for pre in prefixes)
        if "backbone" in prefixes and not pname.startswith(head):
            hit = True
        if hit:
            p.requires_grad_(False)
            n += 1
    if n == 0:
        raise ValueError(f"--freeze {','.join(prefixes)} matched no parameters; top-level "
                         f"modules are {[k for k, _ in model.named_children()]}")
    return n
