"""One torch.autograd.Function per layer. Forward and backward call
torch.ops.fastlayers.*; each saves only what its backward needs.

Double backward (create_graph=True, e.g. gradient penalties, Hessian-vector
products): backward then runs with grad mode on and builds its gradients
from differentiable pieces instead of the fused backward ops: Linear from
LinearFunction itself, Conv2d from Conv2dFunction and Conv2dGrad (its
grad_input and grad_weight, each the other's derivative, so any order
works), MaxPool2d from a Function whose derivative is a gather at
the argmax, BatchNorm from torch elementwise ops and reductions (the batch
statistics recomputed from the input, so the graph sees them depend on it).
"""
import torch

ops = torch.ops.fastlayers


def _create_graph():
    # backward runs with grad mode on only under create_graph=True.
    return torch.is_grad_enabled()


def _channels_last(t):
    """Whether t is (strictly) channels-last: the layout its gradient gets."""
    try:
        return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
                and not t.is_contiguous())
    except RuntimeError:  # inside torch.func.vmap layouts cannot be queried: contiguous
        return False


def _grad_or_none(t, needed):
    return t if needed else None


def _eager_twin(cls):
    """Gives cls (the setup_context form torch.func needs) a twin in the ctx-forward form,
    cls.eager, with the same forward, setup_context and backward. torch's Function.apply
    binds a setup_context Function's arguments by inspect.signature on every call (30-90 us
    more per call, measured on an identity Function: as much as a small layer's kernels);
    the twin's apply does not."""
    def forward(ctx, *args):
        out = cls.forward(*args)
        cls.setup_context(ctx, args, out)
        return out
    cls.eager = type(cls.__name__ + "Eager", (torch.autograd.Function,),
                     {"forward": staticmethod(forward), "backward": staticmethod(cls.backward),
                      "__doc__": f"{cls.__name__} in the ctx-forward form (see _eager_twin)."})
    return cls


def apply(fn, *args):
    """fn.apply(*args) for our Functions: the eager twin unless torch.func transforms or
    torch.compile (which traces either form) are at work."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return fn.eager.apply(*args)


@_eager_twin
class LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b for 2-D x [M, K]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias):
        return ops.linear_forward(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _ = inputs
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        # dX needs W, dW needs X; db needs neither.
        ctx.save_for_backward(input if need_w else None, weight if need_x else None)
        ctx.shapes = (input.shape, weight.shape)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if _create_graph():  # dX = dY W, dW = dY^T X, db = sum dY, all differentiable
            gi = apply(LinearFunction, grad_output, weight.t(), None) if mask[0] else None
            gw = apply(LinearFunction, grad_output.t(), input.t(), None) if mask[1] else None
            gb = grad_output.sum(0) if mask[2] else None
            return gi, gw, gb
        x_shape, w_shape = ctx.shapes
        # ops.linear_backward needs both operands for shapes; stand in with
        # stride-0 views (no memory) for the one we did not keep.
        if input is None:
            input = grad_output.new_zeros(()).expand(x_shape)
        if weight is None:
            weight = grad_output.new_zeros(()).expand(w_shape)
        gi, gw, gb = ops.linear_backward(grad_output, input, weight, mask)
        return _grad_or_none(gi, mask[0]), _grad_or_none(gw, mask[1]), _grad_or_none(gb, mask[2])


@_eager_twin
class Conv2dFunction(torch.autograd.Function):
    """2-D convolution of a 4-D input with symmetric zero padding."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return ops.conv2d_forward(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _, stride, padding, dilation, groups = inputs
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        # dX needs W, dW needs X (a frozen layer keeps no activation).
        ctx.save_for_backward(input if need_w else None, weight if need_x else None)
        ctx.layouts = ((input.shape, input.stride()), (weight.shape, weight.stride()))
        ctx.conf = (stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if _create_graph():
            (x_shape, x_stride), (w_shape, w_stride) = ctx.layouts
            gi = (apply(Conv2dGrad, grad_output, weight, x_shape, x_stride, ctx.conf, 0)
                  if mask[0] else None)
            gw = (apply(Conv2dGrad, grad_output, input, w_shape, w_stride, ctx.conf, 1)
                  if mask[1] else None)
            gb = grad_output.sum((0, 2, 3)) if mask[2] else None
            return gi, gw, gb, None, None, None, None
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


@_eager_twin
class Conv2dGrad(torch.autograd.Function):
    """One gradient of a convolution as a differentiable function (double
    backward): which = 0 is grad_input dX(dY, W) (other = W), which = 1 is
    grad_weight dW(dY, X) (other = X). Each is linear in both arguments: the
    derivative along dY is a forward convolution, the one along `other` the
    other gradient, so any order of derivative works."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, other, shape, stride, conf, which):
        standin = grad_output.new_empty_strided(shape, stride)  # shape and layout only
        x, w = (standin, other) if which == 0 else (other, standin)
        return ops.conv2d_backward(grad_output, x, w, *conf,
                                   [which == 0, which == 1, False])[which]

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, other, _, _, conf, which = inputs
        ctx.save_for_backward(grad_output, other)
        ctx.conf, ctx.which = conf, which

    @staticmethod
    def backward(ctx, g):
        grad_output, other = ctx.saved_tensors
        need_dy, need_other = ctx.needs_input_grad[:2]
        x, w = (g, other) if ctx.which == 0 else (other, g)
        gdy = apply(Conv2dFunction, x, w, None, *ctx.conf) if need_dy else None
        # d/d other: the other gradient, with g in place of what it differentiates by
        gother = (apply(Conv2dGrad, grad_output, g, other.shape, other.stride(), ctx.conf,
                                   1 - ctx.which) if need_other else None)
        return gdy, gother, None, None, None, None


@_eager_twin
class MaxPool2dGradInput(torch.autograd.Function):
    """MaxPool2d's grad_input as a differentiable function of grad_output
    (double backward): its derivative takes the incoming gradient at each
    window's argmax (zero for a window with no element inside the input)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output, offsets, size, k, s, p, d, channels_last):
        return ops.max_pool2d_backward(grad_output, offsets, size, k, s, p, d, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, offsets, size, k, s, p, d, _ = inputs
        ctx.save_for_backward(offsets)
        ctx.conf = (size, k, s, p, d)

    @staticmethod
    def backward(ctx, g):
        (offsets,) = ctx.saved_tensors
        (_, _, H, W), (kH, kW), (sH, sW), (pH, pW), (dH, dW) = ctx.conf
        oh, ow = offsets.shape[2:]
        o = offsets.long()
        dev = offsets.device
        ih = (torch.arange(oh, device=dev) * sH - pH).view(-1, 1) + o // kW * dH
        iw = torch.arange(ow, device=dev) * sW - pW + o % kW * dW
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        idx = (ih.clamp(0, H - 1) * W + iw.clamp(0, W - 1)).flatten(2)
        picked = g.flatten(2).gather(2, idx).view(offsets.shape)
        ggo = torch.where(inside, picked, torch.zeros((), dtype=g.dtype, device=dev))
        return ggo, None, None, None, None, None, None, None


@_eager_twin
class MaxPool2dFunction(torch.autograd.Function):
    """Returns (output, offsets); backward needs only the compact offsets
    (uint8 window positions), not the input."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return ops.max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, _ = inputs
        offsets = output[1]
        ctx.mark_non_differentiable(offsets)
        # No zero gradient for the offsets output (autograd would otherwise
        # allocate and fill one every backward; it is never read).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(offsets)
        ctx.conf = (list(input.shape), kernel_size, stride, padding, dilation,
                    _channels_last(input))

    @staticmethod
    def backward(ctx, grad_output, _grad_offsets):
        if grad_output is None:  # output unused: no gradient flows
            return None, None, None, None, None, None
        (offsets,) = ctx.saved_tensors
        size, k, s, p, d, channels_last = ctx.conf
        if _create_graph():
            gi = apply(MaxPool2dGradInput, grad_output, offsets, size, k, s, p, d, channels_last)
            return gi, None, None, None, None, None
        gi = ops.max_pool2d_backward(grad_output, offsets, size, k, s, p, d, channels_last)
        return gi, None, None, None, None, None


@_eager_twin
class BatchNorm2dFunction(torch.autograd.Function):
    """Batch normalisation over dim 1 of an (N, C, *) input (BatchNorm1d/2d/3d shapes).
    Returns (output, mean, invstd): the statistics backward uses (the batch's, or in eval
    mode a copy of the running ones, in case the buffers change before backward); the
    callers keep the output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
        if training:
            return ops.batch_norm_train(input, weight, bias, running_mean, running_var,
                                        momentum, eps)
        out = ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
        # Backward of eval mode is the affine map (C values each: cheap to keep).
        return out, running_mean.detach().clone(), torch.rsqrt(running_var.detach() + eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _, _, _, training, _, eps = inputs
        _, mean, invstd = output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        ctx.training = training
        ctx.eps = eps
        ctx.save_for_backward(input, weight, mean, invstd)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        if grad_output is None:  # output unused: no gradient flows
            return None, None, None, None, None, None, None, None
        input, weight, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if _create_graph():
            return _batch_norm_backward_graph(ctx, grad_output, input, weight, mean, invstd,
                                              mask)
        gi, gw, gb = ops.batch_norm_backward(grad_output, input, weight, mean, invstd,
                                             ctx.training, mask)
        return (_grad_or_none(gi, mask[0]), _grad_or_none(gw, mask[1]),
                _grad_or_none(gb, mask[2]), None, None, None, None, None)


def _batch_norm_backward_graph(ctx, dy, x, weight, mean, invstd, mask):
    """BatchNorm's backward from differentiable torch ops (double backward)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if ctx.training:  # statistics recomputed from x, so the graph sees x in them
        mu = x.mean(dims, keepdim=True)
        inv = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + ctx.eps)
    else:
        mu, inv = mean.view(shape), invstd.view(shape)
    xhat = (x - mu) * inv
    gi = gw = gb = None
    if mask[0]:
        g = dy * weight.view(shape) if weight is not None else dy
        if ctx.training:
            g = g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True)
        gi = g * inv
    if mask[1]:
        gw = (dy * xhat).sum(dims)
    if mask[2]:
        gb = dy.sum(dims)
    return gi, gw, gb, None, None, None, None, None
