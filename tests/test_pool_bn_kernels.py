"""CPU ops for MaxPool2d and BatchNorm against torch, on every ISA path.

Calls torch.ops.fastlayers.* directly (no Python layer): max_pool2d_forward /
_backward / _indices, max_pool2d (the value-only forward) and batch_norm_train /
_eval / _backward.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastlayers  # noqa: F401  (registers the ops)
from helpers import DEFAULT_ISA

ops = torch.ops.fastlayers
ISAS = fastlayers._C.supported_isas()
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=ISAS)
def isa(request):
    fastlayers._C.set_isa(request.param)
    yield request.param
    fastlayers._C.set_isa(DEFAULT_ISA)


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _layout(x, layout):
    if layout == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.repeat_interleave(x, 2, dim=3).clone()
        return wide[..., ::2]
    return x.contiguous()


# ---------------------------------------------------------------- MaxPool2d

def _pool(x, k, s, p, d, ceil):
    k, s, p, d = _pair(k), _pair(s), _pair(p), _pair(d)
    y, off = ops.max_pool2d_forward(x, k, s, p, d, ceil)
    idx = ops.max_pool2d_indices(off, x.shape[3], k, s, p, d)
    return y, off, idx


def _check_pool(x, k, s, p, d, ceil, grad=True):
    ref_x = x.detach().clone().requires_grad_(grad)
    ry, ri = F.max_pool2d(ref_x, k, s, p, d, ceil, return_indices=True)
    y, off, idx = _pool(x, k, s, p, d, ceil)
    kk = _pair(k)
    assert off.dtype == (torch.uint8 if kk[0] * kk[1] <= 256 else torch.int32)
    assert y.shape == ry.shape and off.shape == ry.shape and y.dtype == x.dtype
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and off.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y), torch.signbit(ry))  # -0.0 / +0.0 ties: first wins
    assert torch.equal(idx, ri)
    # The value-only forward (calls autograd does not record): the same bits.
    yv = ops.max_pool2d(x, _pair(k), _pair(s), _pair(p), _pair(d), ceil)
    assert yv.shape == y.shape and yv.is_contiguous(memory_format=fmt)
    ibits = torch.int32 if y.dtype == torch.float32 else torch.int64
    assert torch.equal(yv.view(ibits), y.view(ibits))
    if grad and ry.numel() > 0:
        go = torch.randn_like(ry)
        ry.backward(go)
        cl = fmt == torch.channels_last
        gi = ops.max_pool2d_backward(go, off, list(x.shape), _pair(k), _pair(s), _pair(p),
                                     _pair(d), cl)
        assert gi.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(gi, ref_x.grad, rtol=1e-6, atol=1e-6)


POOL_CASES = [
    # kernel, stride, padding, dilation, ceil_mode
    (2, 2, 0, 1, False),
    (3, 2, 1, 1, False),
    (3, 1, 1, 1, False),
    (3, 2, 1, 1, True),
    (3, 3, 0, 1, True),
    (2, 1, 0, 1, False),
    (4, 3, 2, 1, True),
    (5, 2, 2, 1, False),
    (3, 2, 1, 2, False),
    (3, 1, 0, 3, True),
    ((2, 3), (1, 2), (1, 0), (2, 1), False),
    ((3, 1), (2, 3), (0, 0), (1, 1), True),
    (2, 4, 1, 1, True),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
@pytest.mark.parametrize("layout", ["contig", "cl", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_matches_torch(isa, case, layout, dtype):
    torch.manual_seed(hash((case, layout)) % 1000)
    k, s, p, d, ceil = case
    for shape in [(2, 5, 13, 17), (1, 19, 9, 40), (1, 3, 7, 7)]:
        x = _layout(torch.randn(shape, dtype=dtype), layout)
        try:
            F.max_pool2d(x, k, s, p, d, ceil)
        except RuntimeError:
            continue  # output too small for this shape
        _check_pool(x, k, s, p, d, ceil)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_pool_nan_inf_ties(isa, dtype, layout):
    torch.manual_seed(1)
    x = torch.randint(-2, 3, (2, 11, 15, 21)).to(dtype)  # many ties
    x[0, 0, 2, 3] = float("nan")
    x[0, 0, 2, 4] = float("nan")  # two NaNs in one window: the last one wins
    x[1, 3] = float("-inf")  # whole plane -inf
    x[1, 4, :5, :5] = float("-inf")
    x[0, 5, 7, 7] = float("inf")
    x = _layout(x, layout)
    for case in [(2, 2, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 1, 2, False)]:
        _check_pool(x, *case, grad=False)
    _check_pool(x, 3, 2, 1, 1, False, grad=True)


@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_pool_batch0_batch1_and_big_window(isa, layout):
    x = _layout(torch.randn(0, 3, 8, 8), layout)
    y, off, idx = _pool(x, 2, 2, 0, 1, False)
    assert y.shape == (0, 3, 4, 4) and idx.shape == (0, 3, 4, 4)
    gi = ops.max_pool2d_backward(torch.zeros(0, 3, 4, 4), off, [0, 3, 8, 8], [2, 2], [2, 2],
                                 [0, 0], [1, 1], layout == "cl")
    assert gi.shape == (0, 3, 8, 8)
    _check_pool(_layout(torch.randn(1, 1, 8, 8), layout), 2, 2, 0, 1, False)
    # more than 256 window positions -> int32 offsets
    x = _layout(torch.randn(2, 10, 20, 22), layout)
    _check_pool(x, (17, 16), (2, 3), (8, 8), 1, True)


def test_pool_empty_window():
    # H = W = 1, k = 2, d = 2, p = 1: the only window covers positions -1 and 1.
    x = torch.randn(1, 2, 1, 1)
    ry, ri = F.max_pool2d(x, 2, 1, 1, 2, return_indices=True)
    for isa_name in ISAS:
        fastlayers._C.set_isa(isa_name)
        y, off, idx = _pool(x, 2, 1, 1, 2, False)
        assert torch.equal(y, ry) and torch.isneginf(y).all()
        assert torch.equal(idx, ri)  # torch's (out of range) index
        # backward sends nothing from such outputs (and does not write out of bounds)
        gi = ops.max_pool2d_backward(torch.ones_like(y), off, list(x.shape), [2, 2], [1, 1],
                                     [1, 1], [2, 2], False)
        assert torch.equal(gi, torch.zeros_like(x))
    fastlayers._C.set_isa(DEFAULT_ISA)


def test_pool_garbage_offsets_are_ignored():
    off = torch.full((1, 1, 2, 2), 200, dtype=torch.uint8)  # 2x2 window: 200 is invalid
    gi = ops.max_pool2d_backward(torch.ones(1, 1, 2, 2), off, [1, 1, 4, 4], [2, 2], [2, 2],
                                 [0, 0], [1, 1], False)
    assert torch.equal(gi, torch.zeros(1, 1, 4, 4))
    off32 = torch.full((1, 1, 1, 1), -5, dtype=torch.int32)
    gi = ops.max_pool2d_backward(torch.ones(1, 1, 1, 1), off32, [1, 1, 17, 17], [17, 17],
                                 [17, 17], [0, 0], [1, 1], False)
    assert torch.equal(gi, torch.zeros(1, 1, 17, 17))


def test_pool_backward_deterministic_over_threads():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 30, 30)
    old = torch.get_num_threads()
    for cl in (False, True):
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        y, off = ops.max_pool2d_forward(xx, [3, 3], [1, 1], [1, 1], [1, 1], False)
        go = torch.randn_like(y)
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(ops.max_pool2d_backward(go, off, list(x.shape), [3, 3], [1, 1], [1, 1],
                                                [1, 1], cl))
        torch.set_num_threads(old)
        assert all(torch.equal(outs[0], o) for o in outs[1:])


POOL_ERRORS = [
    # (input shape, kernel, stride, padding, dilation, ceil)
    ((1, 1, 5, 5), 0, 1, 0, 1, False),  # kernel 0
    ((1, 1, 5, 5), 2, 0, 0, 1, False),  # stride 0
    ((1, 1, 5, 5), 2, -1, 0, 1, False),  # negative stride
    ((1, 1, 5, 5), 2, 1, 0, 0, False),  # dilation 0
    ((1, 1, 5, 5), 3, 1, -1, 1, False),  # negative pad
    ((1, 1, 5, 5), 2, 2, 2, 1, False),  # pad > half effective kernel
    ((1, 1, 9, 9), 2, 1, 2, 3, False),  # pad > half kernel (but <= half effective)
    ((1, 1, 5, 5), 6, 6, 0, 1, False),  # output too small
    ((1, 1, 5, 5), 3, 1, 0, 3, False),  # output too small through dilation
    ((1, 0, 5, 5), 2, 2, 0, 1, False),  # empty channel dim
]


@pytest.mark.parametrize("case", POOL_ERRORS, ids=str)
def test_pool_errors_like_torch(case):
    shape, k, s, p, d, ceil = case
    x = torch.randn(shape)
    with pytest.raises(Exception) as ref:
        F.max_pool2d(x, k, s, p, d, ceil)
    with pytest.raises(type(ref.value)):
        ops.max_pool2d_forward(x, _pair(k), _pair(s), _pair(p), _pair(d), ceil)


def test_pool_errors_dims_dtype():
    with pytest.raises(RuntimeError, match="4-D"):
        ops.max_pool2d_forward(torch.randn(1, 5, 5), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.max_pool2d_forward(torch.ones(1, 1, 4, 4, dtype=torch.int32), [2, 2], [2, 2],
                               [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="offsets"):
        ops.max_pool2d_backward(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.int64),
                                [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.max_pool2d_backward(torch.ones(1, 1, 2, 3), torch.zeros(1, 1, 2, 2, dtype=torch.uint8),
                                [1, 1, 4, 4], [2, 2], [2, 2], [0, 0], [1, 1], False)


def test_pool_offsets_are_compact():
    x = torch.randn(2, 4, 16, 16)
    y, off, idx = _pool(x, 3, 2, 1, 1, False)
    assert off.element_size() == 1 and idx.dtype == torch.int64
    assert off.numel() * off.element_size() * 8 == idx.numel() * idx.element_size()


# ---------------------------------------------------------------- BatchNorm

def _tol(dtype):
    return dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


BN_SHAPES = [
    ((6, 5), "contig"),
    ((2, 7), "contig"),
    ((1, 7, 3), "contig"),  # batch 1
    ((4, 3, 11), "contig"),
    ((2, 4, 9000), "contig"),  # runs longer than one chunk
    ((3, 6, 5, 7), "contig"),
    ((3, 6, 5, 7), "cl"),
    ((2, 70, 3, 3), "cl"),  # channel tail
    ((5, 1, 4, 4), "cl"),
    ((2, 3, 4, 5, 3), "contig"),
    ((4, 5, 6, 7), "strided"),
]


@pytest.mark.parametrize("shape,layout", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_bn_train_matches_torch(isa, shape, layout, dtype, affine):
    torch.manual_seed(sum(shape))
    C = shape[1]
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], shape[1], shape[2], shape[3] * 2, dtype=dtype)[..., ::2]
    w = torch.randn(C, dtype=dtype) if affine else None
    b = torch.randn(C, dtype=dtype) if affine else None
    M = x.numel() // C
    track = M > 1
    rm = torch.randn(C, dtype=dtype) if track else None
    rv = (torch.rand(C, dtype=dtype) + 0.5) if track else None
    rm_ref = rm.clone() if track else None
    rv_ref = rv.clone() if track else None
    xr = x.detach().clone().requires_grad_()
    wr = w.clone().requires_grad_() if affine else None
    br = b.clone().requires_grad_() if affine else None
    for step in range(3):  # running stats after several steps
        y, sm, si = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
        ry = F.batch_norm(xr, rm_ref, rv_ref, wr, br, True, 0.1, 1e-5) if track else \
            torch.native_batch_norm(xr, wr, br, None, None, True, 0.1, 1e-5)[0]
    tol = _tol(dtype)
    torch.testing.assert_close(y, ry, **tol)
    if x.dim() == 4 and layout == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(sm, x.mean(dims), **tol)
    torch.testing.assert_close(si, 1 / torch.sqrt(x.var(dims, unbiased=False) + 1e-5), **tol)
    assert sm.dtype == dtype and si.dtype == dtype and sm.shape == (C,)
    if track:
        torch.testing.assert_close(rm, rm_ref, **tol)
        torch.testing.assert_close(rv, rv_ref, **tol)
    # backward through the batch statistics
    go = torch.randn_like(ry)
    ry.backward(go)
    mask = [True, affine, affine]
    gi, gw, gb = ops.batch_norm_backward(go, x, w, sm, si, True, mask)
    torch.testing.assert_close(gi, xr.grad, **tol)
    assert gi.is_contiguous(memory_format=torch.channels_last if layout == "cl" else
                            torch.contiguous_format)
    if affine:
        torch.testing.assert_close(gw, wr.grad, **tol)
        torch.testing.assert_close(gb, br.grad, **tol)
    else:
        assert gw.shape == (0,) and gb.shape == (0,)


@pytest.mark.parametrize("shape,layout", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_eval_matches_torch(isa, shape, layout, dtype):
    torch.manual_seed(len(shape))
    C = shape[1]
    x = torch.randn(shape, dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.3
    y = ops.batch_norm_eval(x, w, b, rm, rv, 1e-3)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ry = F.batch_norm(xr, rm, rv, wr, br, False, 0.1, 1e-3)
    tol = _tol(dtype)
    torch.testing.assert_close(y, ry, **tol)
    go = torch.randn_like(ry)
    ry.backward(go)
    invstd = 1 / torch.sqrt(rv + 1e-3)
    gi, gw, gb = ops.batch_norm_backward(go, x, w, rm, invstd, False, [True, True, True])
    torch.testing.assert_close(gi, xr.grad, **tol)
    torch.testing.assert_close(gw, wr.grad, **tol)
    torch.testing.assert_close(gb, br.grad, **tol)
    # masks: only what is asked for
    gi2, gw2, gb2 = ops.batch_norm_backward(go, x, w, rm, invstd, False, [True, False, False])
    assert torch.equal(gi2, gi) and gw2.shape == (0,) and gb2.shape == (0,)
    y0 = ops.batch_norm_eval(x, None, None, rm, rv, 1e-3)
    torch.testing.assert_close(y0, F.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-3), **tol)


@pytest.mark.parametrize("layout", ["contig", "cl"])
def test_bn_large_mean(isa, layout):
    """1e4 + 1e-2 * randn: statistics must not cancel (reference: float64 torch)."""
    torch.manual_seed(3)
    x64 = 1e4 + 1e-2 * torch.randn(8, 6, 9, 11, dtype=torch.float64)
    for dtype, tol in [(torch.float64, dict(rtol=1e-7, atol=1e-7)),
                       (torch.float32, dict(rtol=1e-3, atol=2e-3))]:
        x = x64.to(dtype)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        xd = x.double()  # the exact values we were given
        rm, rv = torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype)
        y, sm, si = ops.batch_norm_train(x, None, None, rm, rv, 1.0, 1e-12)
        ref = F.batch_norm(xd, None, None, None, None, True, 0.0, 1e-12)
        torch.testing.assert_close(y.double(), ref, **tol)
        # save_mean is the double mean rounded once to dtype
        torch.testing.assert_close(sm.double(), xd.mean((0, 2, 3)),
                                   rtol=1e-7 if dtype == torch.float32 else 1e-12, atol=0)
        var = xd.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(rv.double(), var, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                                   atol=0)
    # backward in float64 against torch float64
    xr = x64.clone().requires_grad_()
    ry = F.batch_norm(xr, None, None, None, None, True, 0.0, 1e-12)
    go = torch.randn_like(ry)
    ry.backward(go)
    _, sm, si = ops.batch_norm_train(x64, None, None, None, None, 0.1, 1e-12)
    gi, _, _ = ops.batch_norm_backward(go, x64, None, sm, si, True, [True, False, False])
    torch.testing.assert_close(gi, xr.grad, rtol=1e-6, atol=1e-6)


def test_bn_batch0_keeps_running_stats():
    x = torch.randn(0, 3, 4, 4)
    rm, rv = torch.randn(3), torch.rand(3)
    rm0, rv0 = rm.clone(), rv.clone()
    y, sm, si = ops.batch_norm_train(x, None, None, rm, rv, 0.1, 1e-5)
    assert y.shape == x.shape and sm.shape == (3,)
    assert torch.equal(sm, torch.zeros(3)) and torch.equal(si, torch.zeros(3))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert ops.batch_norm_eval(x, None, None, rm, rv, 1e-5).shape == x.shape
    gi, gw, gb = ops.batch_norm_backward(x, x, torch.ones(3), sm, si, True, [True, True, True])
    assert gi.shape == x.shape and torch.equal(gw, torch.zeros(3)) and torch.equal(gb, torch.zeros(3))


@pytest.mark.parametrize("strided", [False, True])
def test_bn_running_stats_updated_in_place(strided):
    # Dense buffers and strided views are written in place through their
    # strides: torch's update, in the same storage, and (as torch's CPU
    # kernel) without bumping the version counters.
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6, 7) * 3 + 2
    if strided:
        rm, rv = torch.randn(10)[::2], torch.rand(10)[::2] + 0.5
    else:
        rm, rv = torch.randn(5), torch.rand(5) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    ptr_m, ptr_v = rm.data_ptr(), rv.data_ptr()
    F.batch_norm(x, rm_ref, rv_ref, None, None, True, 0.3, 1e-5)
    y, sm, si = ops.batch_norm_train(x, None, None, rm, rv, 0.3, 1e-5)
    assert rm.data_ptr() == ptr_m and rv.data_ptr() == ptr_v
    assert rm.is_contiguous() != strided
    assert (rm._version, rv._version) == (rm_ref._version, rv_ref._version)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-6, atol=1e-6)
    # save_mean / save_invstd are fresh tensors, not the buffers
    assert sm.data_ptr() != ptr_m and si.data_ptr() != ptr_v
    torch.testing.assert_close(sm, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_bn_deterministic_over_threads():
    torch.manual_seed(0)
    old = torch.get_num_threads()
    for x in [torch.randn(4, 6, 70, 70), torch.randn(8, 32, 9, 9).contiguous(
            memory_format=torch.channels_last), torch.randn(1000, 24)]:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            y, sm, si = ops.batch_norm_train(x, None, None, None, None, 0.1, 1e-5)
            g = ops.batch_norm_backward(y, x, torch.ones(x.shape[1]), sm, si, True,
                                        [True, True, True])
            outs.append((y, sm, si) + tuple(g))
        torch.set_num_threads(old)
        for o in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


def test_bn_channel_fused_equals_two_pass():
    """Few channels per thread take the two-pass path, many the channel-fused
    one: both must give bitwise the same results (same chunks, same merge
    order), so the thread count never changes them."""
    torch.manual_seed(1)
    old = torch.get_num_threads()
    try:
        for shape, dtype in [((3, 3, 50, 90), torch.float32), ((2, 3, 9000), torch.float32),
                             ((5, 3, 7, 7), torch.float32), ((5, 3, 7, 7), torch.float64),
                             ((4, 3, 13, 13), torch.float64)]:
            x = (torch.randn(shape) * 2 + 5).to(dtype)
            go = torch.randn(shape).to(dtype)
            w, b = (torch.rand(3) + 0.5).to(dtype), torch.randn(3).to(dtype)
            rm, rv = torch.randn(3).to(dtype), (torch.rand(3) + 0.5).to(dtype)
            outs = []
            for nt in (1, 2):  # C=3: fused with 1 thread, two-pass with 2
                torch.set_num_threads(nt)
                y, sm, si = ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5)
                g = ops.batch_norm_backward(go, x, w, sm, si, True, [True, True, True])
                g2 = ops.batch_norm_backward(go, x, w, sm, si, True, [False, True, True])
                ge = ops.batch_norm_backward(go, x, w, rm, 1 / torch.sqrt(rv + 1e-5), False,
                                             [True, True, True])
                outs.append((y, sm, si) + tuple(g) + tuple(g2[1:]) + tuple(ge))
            for a, c in zip(*outs):
                assert torch.equal(a, c)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("shape,cl", [((2, 8, 257, 263), False), ((4, 64, 64, 64), False),
                                      ((48, 150, 13, 13), False), ((4, 64, 64, 64), True),
                                      ((32, 37, 40, 40), True)], ids=str)
def test_bn_streaming_stores(isa, shape, cl):
    """Outputs >= 4 MiB are written with streaming stores (whole cache lines,
    plain stores at unaligned chunk edges): against float64 torch. 13x13
    planes: channel groups (a partial one at the end of each thread's range),
    each image's run of the group streamed out as one row with per-value
    coefficients. channels_last: rows of C channels, each
    streamed on its own (C = 37: rows not a whole number of cache lines)."""
    torch.manual_seed(2)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=fmt)
    go = torch.randn(shape).contiguous(memory_format=fmt)
    C = shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    y, sm, si = ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5)
    xr = x.double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    ry = F.batch_norm(xr, None, None, wr, br, True, 0.1, 1e-5)
    ry.backward(go.double())
    torch.testing.assert_close(y.double(), ry, rtol=1e-4, atol=1e-4)
    gi, gw, gb = ops.batch_norm_backward(go, x, w, sm, si, True, [True, True, True])
    torch.testing.assert_close(gi.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw.double(), wr.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb.double(), br.grad, rtol=1e-4, atol=1e-3)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    ye = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5)
    ref = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False)
    torch.testing.assert_close(ye.double(), ref, rtol=1e-5, atol=1e-5)
    gie, _, _ = ops.batch_norm_backward(go, x, w, rm, 1 / torch.sqrt(rv + 1e-5), False,
                                         [True, False, False])
    torch.testing.assert_close(gie, go * (w / torch.sqrt(rv + 1e-5)).view(1, C, 1, 1),
                               rtol=1e-5, atol=1e-6)


def test_bn_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError) as ref:
        F.batch_norm(x, None, None, torch.ones(4), None, True)
    with pytest.raises(type(ref.value), match="weight"):
        ops.batch_norm_train(x, torch.ones(4), None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="2 dims"):
        ops.batch_norm_train(torch.randn(4), None, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.batch_norm_eval(torch.ones(4, 3, dtype=torch.int32), None, None,
                            torch.zeros(3), torch.ones(3), 1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.batch_norm_train(x, torch.ones(3, dtype=torch.float64), None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="running_mean"):
        ops.batch_norm_eval(x, None, None, torch.zeros(2), torch.ones(3), 1e-5)
    with pytest.raises(RuntimeError, match="shape"):
        ops.batch_norm_backward(torch.randn(4, 3, 6), x, None, torch.zeros(3), torch.ones(3),
                                True, [True, True, True])


@pytest.mark.parametrize("hw", [(28, 28), (17, 16), (16, 17), (15, 15), (9, 33), (2, 16)])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pool_k2s2_fast_paths(isa, hw, ceil_mode):
    """The 2x2 / stride 2 window has its own forward (OW >= 8) and backward
    kernels: values, argmax (ties, -inf, NaN), indices and gradients as torch,
    odd sizes leaving rows/columns no window covers, rows shorter than 8."""
    torch.manual_seed(0)
    h, w = hw
    x = torch.randn(3, 5, h, w)
    x[0, 0] = 1.0                                  # ties everywhere: first wins
    x[0, 1] = float("-inf")                        # all -inf windows
    x[1, 0, ::3, ::2] = float("nan")               # NaN wins
    x[1, 1] = torch.randint(0, 3, (h, w)).float()  # many ties
    xt, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yt, it = torch.nn.functional.max_pool2d(xt, 2, ceil_mode=ceil_mode, return_indices=True)
    yo, io = fastlayers.functional.max_pool2d(xo, 2, ceil_mode=ceil_mode, return_indices=True)
    torch.testing.assert_close(yo, yt, equal_nan=True)
    assert torch.equal(io, it)
    g = torch.randn_like(yt)
    yt.backward(g)
    yo.backward(g)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=0, atol=0)


@pytest.mark.parametrize("hw", [(112, 112), (17, 16), (16, 17), (15, 33), (9, 40), (3, 15), (5, 64),
                                (1, 20)])
@pytest.mark.parametrize("case", [(3, 2, 1, 1, False), (3, 2, 1, 1, True), (3, 2, 0, 1, False),
                                  (3, 2, 0, 1, True), ((2, 3), (1, 2), (1, 1), (2, 1), False),
                                  ((5, 3), (3, 2), (2, 1), (3, 1), True),
                                  # window rows cached by input row (slot ih % kH when
                                  # the row dilation is 1): shared by 2 or 3 windows,
                                  # kH 1, 4 and 5, stride above the height, row dilation
                                  ((3, 3), (1, 2), (1, 1), (1, 1), False),
                                  ((4, 3), (1, 2), (2, 1), (1, 1), True),
                                  ((5, 3), (2, 2), (2, 1), (1, 1), False),
                                  ((1, 3), (1, 2), (0, 1), (1, 1), False),
                                  ((2, 3), (3, 2), (0, 1), (1, 1), True),
                                  ((3, 3), (1, 2), (1, 1), (2, 1), False)], ids=str)
def test_pool_k3s2_fast_path(isa, hw, case):
    """3-wide windows with column stride 2 (ResNet's k3 s2 p1) read input rows
    directly (OW >= 8): values, argmax (ties, -inf, NaN), indices and
    gradients as torch, padding on both sides, ceil_mode, odd sizes, any
    window height / row stride / row dilation."""
    torch.manual_seed(0)
    h, w = hw
    x = torch.randn(3, 5, h, w)
    x[0, 0] = 1.0                                  # ties everywhere: first wins
    x[0, 1] = float("-inf")                        # all -inf windows
    x[0, 2, :, :3] = float("-inf")                 # -inf next to the left padding
    x[1, 0, ::3, ::2] = float("nan")               # NaN wins
    x[1, 1] = torch.randint(0, 3, (h, w)).float()  # many ties
    x[1, 2, 1::2, 1::4] = float("nan")             # two NaNs in a window: the last wins
    x[1, 2, 1::2, 2::4] = float("nan")
    x[2, 0] = 0.0                                  # -0.0 / +0.0 ties: the first wins
    x[2, 0, ::2, 1::3] = -0.0
    x[2, 0, 1::3, ::2] = -0.0
    k, s, p, d, ceil = case
    try:
        oh = F.max_pool2d(x, k, s, p, d, ceil).shape[2]
    except RuntimeError:
        pytest.skip("output too small")
    kh, sh, ph, dh = _pair(k)[0], _pair(s)[0], _pair(p)[0], _pair(d)[0]
    empty_rows = [all(not 0 <= o * sh - ph + i * dh < h for i in range(kh)) for o in range(oh)]
    empty = any(empty_rows)
    # torch's backward writes out of bounds for windows with no element in
    # the input; there ours sends no gradient (test_pool_empty_window).
    _check_pool(x, k, s, p, d, ceil, grad=not empty)
    if empty and all(empty_rows):  # no window has an element: no gradient at all
        _, off, _ = _pool(x, k, s, p, d, ceil)
        gi = ops.max_pool2d_backward(torch.ones(off.shape), off, list(x.shape), _pair(k),
                                     _pair(s), _pair(p), _pair(d), False)
        assert torch.equal(gi, torch.zeros_like(x))


def test_pool_value_only_default_kernel():
    """Backends without a value-only kernel (CUDA) get the composite one: the
    forward with offsets, offsets dropped. Reached here by dispatching to a
    key with no kernel of its own (PrivateUse1), which runs on CPU tensors."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastlayers::max_pool2d",
                                                          "CompositeExplicitAutograd")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 20)
    x[0, 0, ::2, ::3] = float("nan")
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1)
    for args in (([3, 3], [2, 2], [1, 1], [1, 1], False), ([2, 2], [1, 2], [0, 1], [2, 1], True)):
        y = ops.max_pool2d.default.redispatch(ks, x, *args)
        torch.testing.assert_close(y, F.max_pool2d(x, *args), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", [(3, 2, 1, 1, False), (2, 1, 0, 1, True)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_streaming_stores(isa, case, dtype):
    """Outputs / input gradients of 4 MiB or more are built per plane in a
    buffer and written with streaming stores (SIMD ISAs): same results."""
    torch.manual_seed(0)
    x = torch.randn(5, 64, 100, 112, dtype=dtype)  # k3s2p1 output 4.5 MB with offsets
    x[0, 0] = 1.0
    x[1, 1, ::3, ::2] = float("nan")
    x[2, 2] = float("-inf")
    _check_pool(x, *case)


@pytest.mark.parametrize("hw,p", [((40, 50), 1), ((9, 37), 0), ((1, 40), 1)])
def test_pool_k3s2_backward_any_offsets(isa, hw, p):
    """The k3 s2 backward adds grad_output at whatever offset it is given,
    ignores offsets naming no window position inside the input (garbage,
    padding), and matches a plain reference."""
    torch.manual_seed(0)
    h, w = hw
    oh, ow = (h + 2 * p - 3) // 2 + 1, (w + 2 * p - 3) // 2 + 1
    off = torch.randint(0, 12, (2, 3, oh, ow), dtype=torch.uint8)  # 9..11 invalid
    go = torch.randn(2, 3, oh, ow)
    gi = ops.max_pool2d_backward(go, off, [2, 3, h, w], [3, 3], [2, 2], [p, p], [1, 1], False)
    ref = torch.zeros(2, 3, h, w, dtype=torch.float64)
    o, g = off.long(), go.double()
    for i in range(oh):
        for j in range(ow):
            t = o[:, :, i, j]
            ih, iw = 2 * i - p + t // 3, 2 * j - p + t % 3
            ok = (t < 9) & (ih >= 0) & (ih < h) & (iw >= 0) & (iw < w)
            for n in range(2):
                for c in range(3):
                    if ok[n, c]:
                        ref[n, c, ih[n, c], iw[n, c]] += g[n, c, i, j]
    torch.testing.assert_close(gi, ref.float(), rtol=1e-6, atol=1e-6)
