"""One torch.autograd.Function per layer. Forward and backward call
torch.ops.fastlayers.*; each saves only what its backward needs."""
import torch

ops = torch.ops.fastlayers


def _no_double_backward(name):
    # backward runs with grad mode on only under create_graph=True.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastlayers: double backward through {name} is not supported yet "
            "(backward was called with create_graph=True)")


def _grad_or_none(t, needed):
    return t if needed else None


class LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b for 2-D x [M, K]."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        out = ops.linear_forward(input, weight, bias)
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        # dX needs W, dW needs X; db needs neither.
        ctx.save_for_backward(input if need_w else None, weight if need_x else None)
        ctx.shapes = (input.shape, weight.shape)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        _no_double_backward("linear")
        input, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        x_shape, w_shape = ctx.shapes
        # ops.linear_backward needs both operands for shapes; stand in with
        # stride-0 views (no memory) for the one we did not keep.
        if input is None:
            input = grad_output.new_zeros(()).expand(x_shape)
        if weight is None:
            weight = grad_output.new_zeros(()).expand(w_shape)
        gi, gw, gb = ops.linear_backward(grad_output, input, weight, mask)
        return _grad_or_none(gi, mask[0]), _grad_or_none(gw, mask[1]), _grad_or_none(gb, mask[2])


class Conv2dFunction(torch.autograd.Function):
    """2-D convolution of a 4-D input with symmetric zero padding."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        out = ops.conv2d_forward(input, weight, bias, stride, padding, dilation, groups)
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        # dX needs W, dW needs X (a frozen layer keeps no activation).
        ctx.save_for_backward(input if need_w else None, weight if need_x else None)
        ctx.layouts = ((input.shape, input.stride()), (weight.shape, weight.stride()))
        ctx.conf = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        _no_double_backward("conv2d")
        input, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        # The op reads the shape and memory format of both; a tensor we did not
        # keep is stood in for by an uninitialised one with the same strides
        # (never read, and never touched, so it costs no memory).
        (x_shape, x_stride), (w_shape, w_stride) = ctx.layouts
        if input is None:
            input = grad_output.new_empty_strided(x_shape, x_stride)
        if weight is None:
            weight = grad_output.new_empty_strided(w_shape, w_stride)
        gi, gw, gb = ops.conv2d_backward(grad_output, input, weight, *ctx.conf, mask)
        return (_grad_or_none(gi, mask[0]), _grad_or_none(gw, mask[1]),
                _grad_or_none(gb, mask[2]), None, None, None, None)


class MaxPool2dFunction(torch.autograd.Function):
    """Returns (output, offsets); backward needs only the compact offsets
    (uint8 window positions), not the input."""

    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, dilation, ceil_mode):
        out, offsets = ops.max_pool2d_forward(input, kernel_size, stride, padding, dilation,
                                              ceil_mode)
        ctx.mark_non_differentiable(offsets)
        # No zero gradient for the offsets output (autograd would otherwise
        # allocate and fill one every backward; it is never read).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(offsets)
        ctx.conf = (list(input.shape), kernel_size, stride, padding, dilation,
                    input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last)
                    and not input.is_contiguous())
        return out, offsets

    @staticmethod
    def backward(ctx, grad_output, _grad_offsets):
        _no_double_backward("max_pool2d")
        if grad_output is None:  # output unused: no gradient flows
            return None, None, None, None, None, None
        (offsets,) = ctx.saved_tensors
        size, k, s, p, d, channels_last = ctx.conf
        gi = ops.max_pool2d_backward(grad_output, offsets, size, k, s, p, d, channels_last)
        return gi, None, None, None, None, None


class BatchNorm2dFunction(torch.autograd.Function):
    """Batch normalisation over dim 1 of an (N, C, *) input (BatchNorm1d/2d/3d shapes)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        if training:
            out, mean, invstd = ops.batch_norm_train(input, weight, bias, running_mean,
                                                     running_var, momentum, eps)
        else:
            out = ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
            mean = invstd = None
            if any(ctx.needs_input_grad[:3]):
                # Backward of eval mode is the affine map; keep a copy of the
                # statistics used, in case the buffers change before backward.
                mean = running_mean.detach().clone()
                invstd = torch.rsqrt(running_var.detach() + eps)
        ctx.training = training
        ctx.save_for_backward(input, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        _no_double_backward("batch_norm")
        input, weight, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        gi, gw, gb = ops.batch_norm_backward(grad_output, input, weight, mean, invstd,
                                             ctx.training, mask)
        return (_grad_or_none(gi, mask[0]), _grad_or_none(gw, mask[1]),
                _grad_or_none(gb, mask[2]), None, None, None, None, None)
