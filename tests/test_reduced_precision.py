"""float16 / bfloat16 on the CPU and torch.autocast.

The CPU kernels compute in float32: a layer given float16 / bfloat16 tensors widens
them, runs the float32 kernels and rounds its outputs to the dtype torch.nn gives. Under
torch.autocast, Linear and Conv2d cast their inputs to the region's dtype as torch does.
Results are compared with torch.nn in float64 on the same (rounded) values."""
import pytest
import torch
import torch.nn as tnn

import fastlayers
import fastlayers.nn as fnn
from helpers import close_half

REDUCED = [torch.bfloat16, torch.float16]


def _layers():
    yield "linear", lambda lib: lib.Linear(12, 5), (6, 12), None
    yield "linear_3d", lambda lib: lib.Linear(12, 5, bias=False), (2, 3, 12), None
    yield "conv", lambda lib: lib.Conv2d(4, 6, 3, padding=1, stride=(1, 2)), (2, 4, 9, 8), None
    yield "conv_cl", lambda lib: lib.Conv2d(4, 6, 3, groups=2), (2, 4, 9, 8), torch.channels_last
    yield "depthwise", lambda lib: lib.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 9, 8), None
    yield "pool_k2", lambda lib: lib.MaxPool2d(2), (2, 3, 10, 18), None
    yield "pool_k3s2", lambda lib: lib.MaxPool2d(3, 2, 1), (2, 3, 9, 20), torch.channels_last
    yield "bn_train", lambda lib: lib.BatchNorm2d(3), (4, 3, 5, 6), None
    yield "bn_eval", lambda lib: lib.BatchNorm2d(3).eval(), (4, 3, 5, 6), torch.channels_last


LAYERS = list(_layers())


def _pair(build, dtype):
    torch.manual_seed(0)
    ref = build(tnn)
    ours = build(fastlayers)
    ours.load_state_dict(ref.state_dict())
    if isinstance(ref, tnn.BatchNorm2d):  # non-trivial running statistics for eval
        with torch.no_grad():
            for m in (ref, ours):
                m.running_mean.copy_(torch.linspace(-1, 1, 3))
                m.running_var.copy_(torch.linspace(0.5, 2, 3))
    return ref.double(), ours.to(dtype)


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("name,build,shape,fmt", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_in_reduced_precision(name, build, shape, fmt, dtype):
    ref, ours = _pair(build, dtype)
    x = torch.randn(shape).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    xo = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    y = ours(xo)
    yr = ref(xr)
    assert y.dtype == dtype and y.shape == yr.shape
    if fmt is not None and y.dim() == 4:
        assert y.is_contiguous(memory_format=fmt)
    close_half(y, yr.detach(), dtype, "output")
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    yr.backward(dy.double())
    assert xo.grad.dtype == dtype
    close_half(xo.grad, xr.grad, dtype, "grad_input")
    for (n, p), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        if pr.grad is None:
            continue
        assert p.grad.dtype == dtype, n
        close_half(p.grad, pr.grad, dtype, f"grad {n}")
    for (n, b), (_, br) in zip(ours.named_buffers(), ref.named_buffers()):
        if b.is_floating_point():  # running statistics updated in place, in their dtype
            assert b.dtype == dtype, n
            close_half(b, br, dtype, n)


@pytest.mark.parametrize("dtype", REDUCED)
def test_batch_norm_mixed_parameters(dtype):
    """torch's mixed BatchNorm: float16 / bfloat16 input, float32 parameters and buffers."""
    torch.manual_seed(1)
    ref, ours = tnn.BatchNorm2d(5).double(), fnn.BatchNorm2d(5)
    x = (torch.randn(3, 5, 4, 7) * 3 + 2).to(dtype)
    xo, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yr = ours(xo), ref(xr)
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    close_half(y, yr.detach(), dtype, "output")
    close_half(ours.running_mean, ref.running_mean, dtype, "running_mean")
    close_half(ours.running_var, ref.running_var, dtype, "running_var")
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    yr.backward(dy.double())
    assert ours.weight.grad.dtype == torch.float32 and xo.grad.dtype == dtype
    close_half(xo.grad, xr.grad, dtype, "grad_input")
    close_half(ours.weight.grad, ref.weight.grad, dtype, "grad_weight")
    close_half(ours.bias.grad, ref.bias.grad, dtype, "grad_bias")


def _net(lib):
    return lib.Sequential(lib.Conv2d(3, 8, 3, padding=1), lib.BatchNorm2d(8), lib.ReLU(),
                          lib.MaxPool2d(2), lib.Flatten(), lib.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("dtype", REDUCED)
def test_autocast_like_torch(dtype):
    """Under torch.autocast('cpu'), the network gives torch.nn's dtypes and its numbers
    (to the region's precision), and float32 gradients for the float32 parameters."""
    torch.manual_seed(2)
    ref = _net(tnn)
    ours = fastlayers.convert(ref)
    x = torch.randn(4, 3, 8, 8)
    proj = torch.randn(128, 10) / 4
    outs = []
    for m in (ref, ours):
        m.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            y = m(x)
            # a torch op that autocast runs in `dtype`, feeding one of our layers
            z = m[-1](torch.nn.functional.linear(y, proj))
        (y.float().sum() + z.float().square().sum()).backward()
        outs.append((y, z, [p.grad.clone() for p in m.parameters()]))
    (y_r, z_r, g_r), (y_o, z_o, g_o) = outs
    assert y_o.dtype == y_r.dtype == dtype and z_o.dtype == z_r.dtype == dtype
    close_half(y_o, y_r.double(), dtype, "output")
    close_half(z_o, z_r.double(), dtype, "output of the layer after a torch op")
    for i, (a, b) in enumerate(zip(g_o, g_r)):
        assert a.dtype == b.dtype == torch.float32, i
        close_half(a, b.double(), dtype, f"grad {i}")


def test_autocast_keeps_float64_and_other_devices():
    """Autocast casts float32 only (float64 stays, as in torch), and only in a region of
    the tensors' device type."""
    lin = fnn.Linear(4, 3).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert fnn.Linear(4, 3)(torch.randn(2, 4)).dtype == torch.float32


def test_reduced_dtype_rules_like_torch():
    """Outside autocast, mixed dtypes are refused as torch refuses them; integers too."""
    x, w = torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(3, 4)
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, w)
    with pytest.raises(RuntimeError, match="same dtype"):
        fastlayers.functional.linear(x, w)
    with pytest.raises(RuntimeError, match="dtype"):
        fastlayers.functional.conv2d(torch.randn(1, 2, 5, 5, dtype=torch.float16),
                                     torch.randn(3, 2, 3, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="weight has dtype Half; expected BFloat16 or float32"):
        # BatchNorm parameters: the input's dtype or float32, not another reduced one
        fastlayers.functional.batch_norm(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16), None, None,
                                         torch.ones(3, dtype=torch.float16), None, training=True)
