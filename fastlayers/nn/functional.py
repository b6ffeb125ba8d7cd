"""Drop-in for torch.nn.functional with linear, conv2d, max_pool2d and
batch_norm replaced by fastlayers'."""
import torch.nn.functional as _tF
from torch.nn.functional import *  # noqa: F401,F403

from ..functional import (batch_norm, conv2d, linear, max_pool2d,  # noqa: F401
                          max_pool2d_with_indices)


def __getattr__(name):
    return getattr(_tF, name)
