"""Huge tensors: more than 2^31 elements (index math must be int64), and sizes
whose products overflow int64 (a clean error, never a crash or a wrapped
result). The huge ones need 9-24 GB of RAM and run by hand (`-m slow`)."""
import pytest
import torch

import fastlayers
import fastlayers.functional as F

ops = torch.ops.fastlayers
BIG = 2 ** 31


@pytest.mark.parametrize("call", [
    lambda x, w: F.conv2d(x, w, dilation=2 ** 62),
    lambda x, w: F.conv2d(x, w, padding=2 ** 62),
    lambda x, w: F.conv2d(x, w, padding=(2 ** 62, 0), dilation=2 ** 61),
    lambda x, w: F.max_pool2d(x, 2 ** 62),
    lambda x, w: F.max_pool2d(x, 3, padding=2 ** 62),
    lambda x, w: F.max_pool2d(x, 3, dilation=2 ** 62),
    lambda x, w: F.max_pool2d(x, 2 ** 31, dilation=2 ** 33, padding=2 ** 62),
])
def test_int64_overflowing_sizes_raise_cleanly(call):
    x, w = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 3, 3)
    with pytest.raises(RuntimeError):
        call(x, w)


def _free_gb():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2 ** 20


def needs_ram(gb):
    return pytest.mark.skipif(not __import__("os").path.exists("/proc/meminfo") or _free_gb() < gb,
                              reason=f"needs ~{gb} GB of free RAM")


@pytest.mark.slow
@needs_ram(22)
def test_max_pool2d_over_2_31_elements():
    h = w = 46341                               # 2,147,488,281 elements > 2^31
    x = torch.empty(1, 1, h, w)
    x.copy_(torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w))  # x[r, c] = r
    assert x.numel() > BIG
    out, off = ops.max_pool2d_forward(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    del x
    assert out.shape == (1, 1, 23170, 23170) and off.dtype == torch.uint8
    # the tail of the last row lies past flat index 2^31 of the input
    assert torch.equal(out[0, 0, -1, -3000:], torch.full((3000,), 46339.0))
    assert torch.equal(out[0, 0, :, 0], torch.arange(1, 46340, 2, dtype=torch.float32))
    assert bool((off[0, 0, -1, -3000:] == 2).all())   # first max of the window: (kh=1, kw=0)
    gx = ops.max_pool2d_backward(torch.ones_like(out), off, [1, 1, h, w], [2, 2], [2, 2], [0, 0],
                                 [1, 1], False)
    assert gx.sum(dtype=torch.float64).item() == out.numel()
    tail = gx[0, 0, -2, -3000:]                   # row 46339: ones at even columns
    assert torch.equal(tail[::2], torch.ones(1500)) and torch.equal(tail[1::2], torch.zeros(1500))


@pytest.mark.slow
@needs_ram(18)  # input + output: 2 x 8.6 GB (peak RSS measured 16.2 GB)
def test_batch_norm_over_2_31_elements():
    x = torch.empty(2, 1, 32768, 32769)         # 2,147,549,184 elements
    assert x.numel() > BIG
    x[0].fill_(0.0)
    x[1].fill_(1.0)                             # mean 0.5, biased var 0.25
    rm, rv = torch.zeros(1), torch.ones(1)
    out, mean, invstd = ops.batch_norm_train(x, None, None, rm, rv, 0.1, 0.0)
    assert mean.item() == pytest.approx(0.5, abs=1e-6)
    assert invstd.item() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(out[1, 0, -1, -4000:], torch.ones(4000), atol=1e-4)
    assert torch.allclose(out[0, 0, 0, :4000], -torch.ones(4000), atol=1e-4)
    assert rm.item() == pytest.approx(0.05, abs=1e-6)
    del out
    y = ops.batch_norm_eval(x, None, None, torch.full((1,), 0.5), torch.full((1,), 0.25), 0.0)
    assert torch.allclose(y[1, 0, -1, -4000:], torch.ones(4000), atol=1e-4)


@pytest.mark.slow
@needs_ram(10)
def test_linear_gemm_index_products_over_2_31():
    m, k = 2 ** 16 + 3, 2 ** 15                # M*K = 2,147,581,952 > 2^31
    x = torch.ones(m, k)
    w = torch.stack([torch.ones(k), torch.arange(k, dtype=torch.float32) % 7])
    y = F.linear(x, w)
    expect1 = float((torch.arange(k) % 7).sum())
    assert torch.equal(y[-5:, 0], torch.full((5,), float(k)))
    assert torch.equal(y[-5:, 1], torch.full((5,), expect1))
    gw = ops.linear_backward(torch.ones(m, 2), x, w, [False, True, False])[1]
    assert torch.equal(gw, torch.full((2, k), float(m)))


@pytest.mark.slow
@needs_ram(12)
def test_conv2d_over_2_31_elements():
    h = w = 46341
    x = torch.ones(1, 1, h, w)
    assert x.numel() > BIG
    y = F.conv2d(x, torch.ones(1, 1, 3, 3), stride=2)
    assert y.shape == (1, 1, 23170, 23170)
    assert bool((y[0, 0, -1, -3000:] == 9).all()) and bool((y[0, 0, 0, :100] == 9).all())
