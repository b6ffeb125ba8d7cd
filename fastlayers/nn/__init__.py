"""Drop-in for torch.nn: `import fastlayers.nn as nn`.

Everything is torch.nn's, except Linear, Conv2d, MaxPool2d and BatchNorm2d,
which are fastlayers' (subclasses of torch's, running our kernels).
"""
import torch.nn as _tnn
from torch.nn import *  # noqa: F401,F403
from torch.nn import init, utils, parallel, parameter, modules  # noqa: F401

from ..modules import BatchNorm2d, Conv2d, Linear, MaxPool2d  # noqa: F401
import importlib as _importlib

# `from torch.nn import *` brought torch.nn.functional in as `functional`;
# load ours explicitly (a plain `from . import functional` would keep torch's).
functional = _importlib.import_module(__name__ + ".functional")


def __getattr__(name):  # anything else torch.nn has (private helpers, new names)
    return getattr(_tnn, name)
