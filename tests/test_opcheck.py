"""torch.library.opcheck on every op: schema, fake kernels (shapes and
strides), autograd registration and AOT dispatch agree with the kernels."""
import pytest
import torch

import fastlayers  # noqa: F401

ops = torch.ops.fastlayers


def t(*shape, cl=False, dtype=torch.float32, grad=False):
    x = torch.randn(*shape, dtype=dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _cases():
    m = [True, True, True]
    yield "linear_forward", (t(5, 7), t(3, 7), t(3))
    yield "linear_forward", (t(5, 7), t(3, 7), None)
    yield "linear_backward", (t(5, 3), t(5, 7), t(3, 7), m)
    yield "linear_backward", (t(5, 3), t(5, 7), t(3, 7), [True, False, False])
    conv = ([1, 2], [1, 0], [1, 1], 2)
    yield "conv2d_forward", (t(2, 4, 7, 6), t(6, 2, 3, 3), t(6), *conv)
    yield "conv2d_forward", (t(2, 4, 7, 6, cl=True), t(6, 2, 3, 3), None, *conv)
    yield "conv2d_backward", (t(2, 6, 7, 2), t(2, 4, 7, 6), t(6, 2, 3, 3), *conv, m)
    yield "conv2d_backward", (t(2, 6, 7, 2, cl=True), t(2, 4, 7, 6, cl=True), t(6, 2, 3, 3),
                              *conv, [True, True, False])
    pool = ([3, 3], [2, 2], [1, 1], [1, 1])
    yield "max_pool2d_forward", (t(2, 3, 9, 8), *pool, False)
    yield "max_pool2d_forward", (t(2, 3, 9, 8, cl=True), *pool, True)
    yield "max_pool2d", (t(2, 3, 9, 20), *pool, False)      # value-only k3s2 kernel
    yield "max_pool2d", (t(2, 3, 9, 8, cl=True), *pool, True)  # via the forward
    x = t(2, 3, 9, 8)
    _, off = ops.max_pool2d_forward(x, *pool, False)
    yield "max_pool2d_backward", (t(2, 3, 5, 4), off, [2, 3, 9, 8], *pool, False)
    yield "max_pool2d_indices", (off, 8, *pool)
    c = 3
    yield "batch_norm_train", (t(4, c, 5, 5), t(c), t(c), torch.zeros(c), torch.ones(c), 0.1, 1e-5)
    yield "batch_norm_train", (t(4, c, 5, 5, cl=True), None, None, None, None, 0.1, 1e-5)
    yield "batch_norm_eval", (t(4, c, 5, 5), t(c), t(c), torch.zeros(c), torch.ones(c) * 2, 1e-5)
    mean, invstd = torch.randn(c), torch.rand(c) + 0.5
    yield "batch_norm_backward", (t(4, c, 5, 5), t(4, c, 5, 5), t(c), mean, invstd, True, m)
    yield "batch_norm_backward", (t(4, c, 5, 5), t(4, c, 5, 5), None, mean, invstd, False,
                                  [True, False, False])
    # bfloat16 / float16 on the CPU (computed in float32): the fake kernels' dtypes
    # (activations in the input's dtype, BatchNorm statistics in float32).
    b16, f16 = torch.bfloat16, torch.float16
    yield "linear_forward", (t(5, 7, dtype=b16), t(3, 7, dtype=b16), t(3, dtype=b16))
    yield "linear_backward", (t(5, 3, dtype=f16), t(5, 7, dtype=f16), t(3, 7, dtype=f16), m)
    yield "conv2d_forward", (t(2, 4, 7, 6, cl=True, dtype=b16), t(6, 2, 3, 3, dtype=b16), None, *conv)
    yield "conv2d_backward", (t(2, 6, 7, 2, dtype=b16), t(2, 4, 7, 6, dtype=b16),
                              t(6, 2, 3, 3, dtype=b16), *conv, m)
    xb = t(2, 3, 9, 8, dtype=b16)
    _, offb = ops.max_pool2d_forward(xb, *pool, False)
    yield "max_pool2d_forward", (xb, *pool, False)
    yield "max_pool2d", (t(2, 3, 9, 20, dtype=f16), *pool, False)
    yield "max_pool2d_backward", (t(2, 3, 5, 4, dtype=b16), offb, [2, 3, 9, 8], *pool, False)
    yield "batch_norm_train", (t(4, c, 5, 5, dtype=b16), t(c), t(c), torch.zeros(c), torch.ones(c),
                               0.1, 1e-5)
    yield "batch_norm_eval", (t(4, c, 5, 5, dtype=f16), t(c, dtype=f16), t(c, dtype=f16),
                              torch.zeros(c, dtype=f16), torch.ones(c, dtype=f16), 1e-5)
    yield "batch_norm_backward", (t(4, c, 5, 5, dtype=b16), t(4, c, 5, 5, dtype=b16), t(c), mean,
                                  invstd, True, m)


CASES = list(_cases())


@pytest.mark.parametrize("name,args", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(ops, name).default, args)
