"""fastlayers: torch.nn's Linear, Conv2d, MaxPool2d and BatchNorm2d on our own kernels."""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers torch.ops.fastlayers.*)
