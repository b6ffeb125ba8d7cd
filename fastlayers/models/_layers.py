"""Choosing the layer namespace a model is built from.

`layers="fastlayers"` builds Linear/Conv2d/MaxPool2d/BatchNorm2d from `fastlayers.nn`
(our kernels), `layers="torch"` from `torch.nn`. Everything else (activations,
dropout, flatten, adaptive pooling) always comes from torch.nn. Because the fastlayers
modules subclass the torch.nn ones, the two builds have identical state_dict keys and
shapes, so weights move between them with a plain `load_state_dict`.
"""
import types

import torch.nn as tnn

LAYER_CHOICES = ("fastlayers", "torch")


def fastlayers_available():
    try:
        import fastlayers.nn  # noqa: F401
    except ImportError:
        return False
    return True


def fastlayers_status():
    """(ok, reason): whether fastlayers.nn imports and its four layers run a tiny
    forward and backward here. Used by tests to skip with a reason instead of failing
    on a checkout whose kernels are not built yet."""
    try:
        import torch
        import fastlayers.nn as fnn
        x = torch.randn(2, 1, 6, 6, requires_grad=True)
        y = fnn.MaxPool2d(2)(fnn.BatchNorm2d(2)(fnn.Conv2d(1, 2, 3, padding=1)(x)))
        fnn.Linear(18, 2)(y.flatten(1)).sum().backward()
    except Exception as e:  # noqa: BLE001 (any failure means: not usable)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"fastlayers.nn not usable here: {type(e).__name__}: {msg[:200]}"
    return True, "fastlayers.nn works"


def get_layers(layers="fastlayers"):
    """The module namespace providing Linear, Conv2d, MaxPool2d and BatchNorm2d."""
    if isinstance(layers, types.ModuleType):
        return layers
    if layers == "torch":
        return tnn
    if layers == "fastlayers":
        try:
            import fastlayers.nn as fnn
        except ImportError as e:
            raise ImportError(f"layers='fastlayers' needs fastlayers.nn, which failed to import "
                              f"({e}); use layers='torch' for the torch.nn twin") from e
        return fnn
    raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")


def layers_name(layers):
    if isinstance(layers, types.ModuleType):
        return "torch" if layers is tnn else "fastlayers"
    return layers
