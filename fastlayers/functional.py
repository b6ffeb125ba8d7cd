"""torch.nn.functional-compatible entry points for the four layers.

Signatures match torch.nn.functional. Argument parsing, the cases that torch
also handles in Python (3-D unbatched input, 'same'/'valid' padding, leading
dimensions of Linear), and torch's error types live here; the arithmetic is in
torch.ops.fastlayers.* via the autograd Functions in functions.py.
"""
import numbers
from typing import List, Optional

import torch
import torch.nn.functional as _F
from torch import Tensor

from .functions import BatchNorm2dFunction, Conv2dFunction, LinearFunction, MaxPool2dFunction
from .functions import apply as _apply

__all__ = ["linear", "conv2d", "max_pool2d", "max_pool2d_with_indices", "batch_norm"]


_ops = torch.ops.fastlayers


def _graph(*tensors) -> bool:
    """Whether autograd must record this call. When not (inference, no_grad,
    frozen inputs), the op is called directly: the autograd.Function costs
    ~15 us of Python per call, as much as a small layer's arithmetic."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_tensor(name, t, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"argument '{name}' must be Tensor, not {type(t).__name__}")


def _int_tuple(name, value, n=2, allow_empty=False) -> List[int]:
    """torch's _pair with torch's TypeError for non-integers."""
    # Fast paths for what modules pass (plain ints, tuples of n ints): the
    # general checks below cost microseconds per call (ABC isinstance).
    if type(value) is int:
        return [value] * n
    if type(value) in (tuple, list) and len(value) == n and all(type(v) is int for v in value):
        return list(value)
    if isinstance(value, (bool, str)) or not isinstance(value, (numbers.Integral, tuple, list)):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        else:
            raise TypeError(f"argument '{name}' must be int or tuple of {n} ints, "
                            f"not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return [int(value)] * n
    value = list(value)
    if allow_empty and len(value) == 0:
        return []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"argument '{name}' must be int or tuple of {n} ints, "
                            f"but got an element of type {type(v).__name__}")
    if len(value) == 1:
        return [int(value[0])] * n
    if len(value) != n:
        raise RuntimeError(f"{name} must either be a single int, or a tuple of {n} ints")
    return [int(v) for v in value]


def _autocast(input, weight, bias):
    """torch.autocast's rule for linear and conv2d: inside an autocast region of the
    input's device type, floating tensors other than float64 are cast to the region's
    dtype (torch.get_autocast_dtype), so the layer computes and returns that dtype. Our
    ops are not in autocast's lists, so the layers apply the rule themselves. (On the
    CPU, float16 / bfloat16 are computed by the float32 kernels; the output is rounded.)"""
    dev = input.device.type
    if not torch.is_autocast_enabled(dev):
        return input, weight, bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype in (dt, torch.float64):
            return t
        return t.to(dt)
    return cast(input), cast(weight), cast(bias)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    _check_tensor("bias", bias, optional=True)
    input, weight, bias = _autocast(input, weight, bias)
    if input.dim() == 0:
        raise RuntimeError("fastlayers.linear: input must have at least 1 dimension, got a scalar")
    if weight.dim() == 1:  # F.linear allows a 1-D weight: out = input @ weight
        out = linear(input, weight.unsqueeze(0), None).squeeze(-1)
        return out + bias if bias is not None else out
    if weight.dim() != 2:
        raise RuntimeError(f"fastlayers.linear: weight must be 1-D or 2-D, got {weight.dim()}-D")
    k = input.shape[-1]
    lead = input.shape[:-1]
    m = 1
    for d in lead:
        m *= d
    x2 = input.reshape(m, k) if input.dim() != 2 else input
    if _graph(x2, weight, bias):
        out = _apply(LinearFunction, x2, weight, bias)
    else:
        out = _ops.linear_forward(x2, weight, bias)
    return out.reshape(*lead, weight.shape[0]) if input.dim() != 2 else out


def _same_padding(input, weight, stride, dilation):
    """padding='same': symmetric part, plus the extra right/bottom pad torch applies."""
    if any(s != 1 for s in stride):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    pads, extra = [], []
    for d, k in zip(dilation, weight.shape[2:]):
        total = d * (k - 1)
        pads.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        input = _F.pad(input, [0, extra[1], 0, extra[0]])
    return input, pads


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
           padding=0, dilation=1, groups: int = 1) -> Tensor:
    _check_tensor("input", input)
    _check_tensor("weight", weight)
    _check_tensor("bias", bias, optional=True)
    input, weight, bias = _autocast(input, weight, bias)
    stride = _int_tuple("stride", stride)
    dilation = _int_tuple("dilation", dilation)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"argument 'groups' must be int, not {type(groups).__name__}")
    if weight.dim() != 4:
        raise RuntimeError(f"fastlayers.conv2d: expected 4-D weight, got {weight.dim()}-D")
    if input.dim() not in (3, 4):
        raise RuntimeError(f"Expected 3D (unbatched) or 4D (batched) input to conv2d, "
                           f"but got input of size: {list(input.shape)}")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            input, padding = _same_padding(input, weight, stride, dilation)
        else:
            raise RuntimeError(f"Invalid padding string: '{padding}', should be one of "
                               "{'valid', 'same'}")
    else:
        padding = _int_tuple("padding", padding)
    if _graph(input, weight, bias):
        out = _apply(Conv2dFunction, input, weight, bias, stride, padding, dilation, int(groups))
    else:
        out = _ops.conv2d_forward(input, weight, bias, stride, padding, dilation, int(groups))
    return out.squeeze(0) if unbatched else out


def _max_pool2d_impl(input, kernel_size, stride, padding, dilation, ceil_mode,
                     need_offsets=True):
    _check_tensor("input", input)
    kernel_size = _int_tuple("kernel_size", kernel_size)
    stride = _int_tuple("stride", stride, allow_empty=True) if stride is not None else []
    if not stride:
        stride = list(kernel_size)
    padding = _int_tuple("padding", padding)
    dilation = _int_tuple("dilation", dilation)
    if input.dim() not in (3, 4):
        raise RuntimeError("non-empty 3D or 4D (batch mode) tensor expected for input, "
                           f"got {input.dim()}-D")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if _graph(x):
        out, offsets = _apply(MaxPool2dFunction, x, kernel_size, stride, padding, dilation,
                                               bool(ceil_mode))
    elif not need_offsets:  # inference: the value-only op
        out = _ops.max_pool2d(x, kernel_size, stride, padding, dilation, bool(ceil_mode))
        offsets = None
    else:
        out, offsets = _ops.max_pool2d_forward(x, kernel_size, stride, padding, dilation,
                                               bool(ceil_mode))
    return out, offsets, (x, kernel_size, stride, padding, dilation, unbatched)


def max_pool2d_with_indices(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                            ceil_mode: bool = False, return_indices: bool = True):
    out, offsets, (x, k, s, p, d, unbatched) = _max_pool2d_impl(
        input, kernel_size, stride, padding, dilation, ceil_mode)
    indices = torch.ops.fastlayers.max_pool2d_indices(offsets, x.shape[-1], k, s, p, d)
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return out, indices


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    if return_indices:
        return max_pool2d_with_indices(input, kernel_size, stride, padding, dilation, ceil_mode)
    out, _, (_, _, _, _, _, unbatched) = _max_pool2d_impl(
        input, kernel_size, stride, padding, dilation, ceil_mode, need_offsets=False)
    return out.squeeze(0) if unbatched else out


def _verify_batch_size(size):
    n = size[0]
    for s in size[2:]:
        n *= s
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {size}")


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    _check_tensor("input", input)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_tensor(name, t, optional=True)
    # Checks in torch's own order (F.batch_norm, then at::_batch_norm_impl_index).
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        # torch: an empty input passes through (the output stays in the graph).
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        return out
    c = input.shape[1] if input.dim() >= 2 else 0
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            if t.numel() != c:
                raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {t.numel()}")
    if input.dim() < 2:  # torch fails here reading size(1)
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1): "
                         "batch_norm expects an (N, C, *) input")
    if _graph(input, weight, bias):
        return _apply(BatchNorm2dFunction, input, weight, bias, running_mean, running_var,
                                         bool(training), float(momentum), float(eps))[0]
    if training:
        return _ops.batch_norm_train(input, weight, bias, running_mean, running_var,
                                     float(momentum), float(eps))[0]
    return _ops.batch_norm_eval(input, weight, bias, running_mean, running_var, float(eps))
