"""fastlayers: torch.nn's Linear, Conv2d, MaxPool2d and BatchNorm2d, forward and
backward, on our own compiled C++ (and CUDA) kernels.

Three ways to switch:
    import fastlayers.nn as nn          # instead of: import torch.nn as nn
    model = fastlayers.convert(model)   # swap the layers of an existing model
    fastlayers.Conv2d(3, 64, 3)         # use a layer directly
"""
import torch  # noqa: F401  (loads libtorch before our extension)

from . import _C  # noqa: F401  (registers torch.ops.fastlayers.*)
from . import _fake  # noqa: F401  (fake kernels for torch.compile / export)
from . import functional
from .convert import convert
from .functions import BatchNorm2dFunction, Conv2dFunction, LinearFunction, MaxPool2dFunction
from .modules import BatchNorm2d, Conv2d, Linear, MaxPool2d

__version__ = "0.1.0"

__all__ = ["Linear", "Conv2d", "MaxPool2d", "BatchNorm2d", "LinearFunction", "Conv2dFunction",
           "MaxPool2dFunction", "BatchNorm2dFunction", "functional", "convert", "build_info",
           "set_isa", "isa", "empty_cache"]


def isa() -> str:
    """The CPU kernel path in use: 'avx512', 'avx2' or 'scalar'."""
    return _C.isa()


def set_isa(name: str) -> str:
    """Force a CPU kernel path ('avx512', 'avx2', 'scalar' or 'auto')."""
    return _C.set_isa(name)


def empty_cache() -> int:
    """Free the blocks (outputs and kernel workspaces, >= 64 KiB) fastlayers
    keeps for reuse after they are freed, like torch.cuda.empty_cache();
    returns the bytes freed. The cache holds at most FASTLAYERS_CACHE_MB
    (default 256) MiB."""
    return int(_C.empty_cache())


def build_info() -> dict:
    """What this build of fastlayers is: CUDA or CPU-only, CPU kernel paths."""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_kernels": bool(_C.with_cuda()),
        "cpu_isa": _C.isa(),
        "cpu_gemm_isa": _C.gemm_isa(),
        "cpu_isas_supported": list(_C.supported_isas()),
        "threads": torch.get_num_threads(),
    }
