"""fastlayers.convert(model): swap torch.nn layers for fastlayers ones in place
of the originals, keeping parameters, buffers, train/eval state and hooks."""
import copy

import torch

from . import modules

# torch.nn class -> fastlayers class. Exact type match: a user subclass of
# torch.nn.Conv2d with its own forward is left alone.
_SWAPS = {
    torch.nn.Linear: modules.Linear,
    torch.nn.Conv2d: modules.Conv2d,
    torch.nn.MaxPool2d: modules.MaxPool2d,
    torch.nn.BatchNorm2d: modules.BatchNorm2d,
}


def _swap(module: torch.nn.Module) -> torch.nn.Module:
    new_cls = _SWAPS.get(type(module))
    if new_cls is None:
        return module
    # Re-class the very object: its __dict__ (parameters, buffers, hooks,
    # training flag, all constructor options) stays exactly as it was.
    module.__class__ = new_cls
    return module


def convert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Return `model` with every torch.nn Linear/Conv2d/MaxPool2d/BatchNorm2d
    replaced by its fastlayers twin. Outputs are unchanged (to float tolerance).
    With inplace=False (the default) the model is deep-copied first."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for m in model.modules():
        _swap(m)
    return model
