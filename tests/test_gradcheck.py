"""torch.autograd.gradcheck in float64 on small shapes, for every layer and
every option family."""
import pytest
import torch
from torch.autograd import gradcheck

import fastlayers.functional as F


def rnd(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (2, 2, 5), (5,)])
def test_linear(isa, bias, shape):
    args = (rnd(*shape), rnd(4, 5), rnd(4) if bias else None)
    assert gradcheck(F.linear, args)


CONV = [
    dict(),
    dict(stride=2, padding=1),
    dict(dilation=2, padding=2),
    dict(groups=2, padding=1),
    dict(padding="same"),
    dict(stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
]


@pytest.mark.parametrize("kw", CONV, ids=[str(i) for i in range(len(CONV))])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d(isa, kw, bias):
    cin, cout = 4, 6
    g = kw.get("groups", 1)
    x, w = rnd(2, cin, 6, 7), rnd(cout, cin // g, 3, 2)
    b = rnd(cout) if bias else None
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, **kw), (x, w, b))


def test_conv2d_depthwise_channels_last(isa):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = rnd(3, 1, 3, 3)
    assert gradcheck(lambda x, w: F.conv2d(x, w, None, padding=1, groups=3), (x, w))


POOL = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=2, dilation=2, padding=1),
]


@pytest.mark.parametrize("kw", POOL, ids=[str(i) for i in range(len(POOL))])
def test_max_pool2d(isa, kw):
    # distinct values so the argmax is stable under gradcheck's perturbation
    x = torch.randperm(2 * 3 * 7 * 8, dtype=torch.float64).reshape(2, 3, 7, 8).requires_grad_()
    assert gradcheck(lambda x: F.max_pool2d(x, **kw), (x,))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 3, 2), (5, 3)])
def test_batch_norm(isa, affine, training, shape):
    c = shape[1]
    w, b = (rnd(c), rnd(c)) if affine else (None, None)
    rm = torch.randn(c, dtype=torch.float64)
    rv = torch.rand(c, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    assert gradcheck(fn, (rnd(*shape), w, b))
