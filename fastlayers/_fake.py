"""Fake (meta) kernels: output shapes, dtypes and strides of every fastlayers op,
so torch.compile and torch.export can trace them without running the kernels.
They must agree exactly with the C++/CUDA kernels (torch.library.opcheck tests it)."""
import torch
from torch._prims_common import suggest_memory_format

_lib = "fastlayers::"


def _empty(shape, like, memory_format=torch.contiguous_format, dtype=None):
    out = like.new_empty(shape, dtype=dtype or like.dtype)
    if len(shape) == 4 and memory_format == torch.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _placeholder(like):
    return like.new_empty((0,))


def conv_output_format(input, weight):
    if suggest_memory_format(input) == torch.channels_last or \
            suggest_memory_format(weight) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out_size(size, k, s, p, d, ceil_mode):
    """torch's pooling_output_shape."""
    num = size + 2 * p - d * (k - 1) - 1 + ((s - 1) if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def offsets_dtype(kernel_size):
    return torch.uint8 if kernel_size[0] * kernel_size[1] <= 256 else torch.int32


@torch.library.register_fake(_lib + "linear_forward")
def _linear_forward(input, weight, bias):
    return input.new_empty((input.shape[0], weight.shape[0]))


@torch.library.register_fake(_lib + "linear_backward")
def _linear_backward(grad_output, input, weight, output_mask):
    gi = input.new_empty(input.shape) if output_mask[0] else _placeholder(input)
    gw = weight.new_empty(weight.shape) if output_mask[1] else _placeholder(input)
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else _placeholder(input)
    return gi, gw, gb


@torch.library.register_fake(_lib + "conv2d_forward")
def _conv2d_forward(input, weight, bias, stride, padding, dilation, groups):
    n, _, h, w = input.shape
    k, _, r, s = weight.shape
    p = conv_out_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_out_size(w, s, stride[1], padding[1], dilation[1])
    return _empty((n, k, p, q), input, conv_output_format(input, weight))


@torch.library.register_fake(_lib + "conv2d_backward")
def _conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    gi = _empty(input.shape, input, conv_output_format(input, weight)) \
        if output_mask[0] else _placeholder(input)
    gw = _empty(weight.shape, weight, suggest_memory_format(weight)) \
        if output_mask[1] else _placeholder(input)
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else _placeholder(input)
    return gi, gw, gb


@torch.library.register_fake(_lib + "max_pool2d_forward")
def _max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    n, c, h, w = input.shape
    oh = pool_out_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_out_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    fmt = suggest_memory_format(input)
    out = _empty((n, c, oh, ow), input, fmt)
    offsets = _empty((n, c, oh, ow), input, fmt, dtype=offsets_dtype(kernel_size))
    return out, offsets


@torch.library.register_fake(_lib + "max_pool2d")
def _max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    return _max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode)[0]


@torch.library.register_fake(_lib + "max_pool2d_backward")
def _max_pool2d_backward(grad_output, offsets, input_size, kernel_size, stride, padding,
                         dilation, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return _empty(tuple(input_size), grad_output, fmt)


@torch.library.register_fake(_lib + "max_pool2d_indices")
def _max_pool2d_indices(offsets, input_width, kernel_size, stride, padding, dilation):
    return _empty(offsets.shape, offsets, suggest_memory_format(offsets), dtype=torch.int64)


def _bn_stat_dtype(input):
    # statistics are float32 for half/bfloat16 input (CUDA), else the input's dtype
    return torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype


def _bn_out(input):
    fmt = suggest_memory_format(input) if input.dim() == 4 else torch.contiguous_format
    return _empty(input.shape, input, fmt)


@torch.library.register_fake(_lib + "batch_norm_train")
def _batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps):
    c = input.shape[1]
    st = _bn_stat_dtype(input)
    return _bn_out(input), input.new_empty((c,), dtype=st), input.new_empty((c,), dtype=st)


@torch.library.register_fake(_lib + "batch_norm_eval")
def _batch_norm_eval(input, weight, bias, running_mean, running_var, eps):
    return _bn_out(input)


@torch.library.register_fake(_lib + "batch_norm_backward")
def _batch_norm_backward(grad_output, input, weight, mean, invstd, training, output_mask):
    c = input.shape[1]
    gi = _bn_out(input) if output_mask[0] else _placeholder(input)
    pdt = weight.dtype if weight is not None else input.dtype
    gw = input.new_empty((c,), dtype=pdt) if output_mask[1] else _placeholder(input)
    gb = input.new_empty((c,), dtype=pdt) if output_mask[2] else _placeholder(input)
    return gi, gw, gb
