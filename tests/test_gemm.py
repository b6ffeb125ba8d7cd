"""The shared GEMM core (csrc/cpu/gemm.cpp), on every ISA path this CPU runs.

Reached through torch.ops.fastlayers.linear_forward / linear_backward and the
test hook torch.ops.fastlayers_internal.gemm_ (any strides for A, B, C;
accumulate; bias per row / per column).  References are float64 torch matmuls.
"""
import pytest
import torch

import fastlayers
from helpers import DEFAULT_ISA

ops = torch.ops.fastlayers
gemm_ = torch.ops.fastlayers_internal.gemm_

ISAS = fastlayers._C.supported_isas()
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=ISAS)
def isa(request):
    fastlayers._C.set_isa(request.param)
    yield request.param
    fastlayers._C.set_isa(DEFAULT_ISA)


def tol(dtype, k):
    # |error| bound scale for sums of k products of O(1) numbers
    return (2e-5 if dtype == torch.float32 else 1e-12) * (k + 4)


def check(got, ref, k):
    assert got.shape == ref.shape
    assert got.dtype in DTYPES
    if ref.numel():
        err = (got.double() - ref).abs().max().item()
        assert err <= tol(got.dtype, k), f"max abs error {err}"


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def layout(t, kind):
    """Same values as t, different strides."""
    if kind == "contig":
        return t
    if kind == "t":  # column-major storage
        return t.t().contiguous().t()
    if kind == "sliced":  # non-unit column stride and padded rows
        big = torch.zeros(t.shape[0] * 2 + 1, t.shape[1] * 3 + 2, dtype=t.dtype)
        v = big[1::2, 2::3][: t.shape[0], : t.shape[1]]
        v.copy_(t)
        return v
    raise AssertionError(kind)


# Shapes around the blocking parameters of every kernel set: MR in {4, 6, 14},
# NR in {8, 16, 32}, KC = 256, MC in {70, 72, 128, 140, 144}.
SHAPES = [
    (1, 1, 1), (1, 7, 3), (5, 1, 9), (2, 3, 1), (6, 16, 8), (7, 17, 5), (13, 31, 29),
    (14, 32, 256), (15, 33, 257), (4, 8, 255), (29, 47, 2), (64, 64, 64), (97, 129, 131),
    (145, 65, 300), (141, 100, 513), (3, 200, 700), (300, 5, 100), (73, 257, 70),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_forward_shapes(isa, dtype, M, N, K):
    x, w, b = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(N, dtype=dtype)
    ref = x.double() @ w.double().t()
    check(ops.linear_forward(x, w, None), ref, K)
    check(ops.linear_forward(x, w, b), ref + b.double(), K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0), (0, 3, 0)])
def test_linear_empty(isa, dtype, M, N, K):
    x, w, b = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(N, dtype=dtype)
    y = ops.linear_forward(x, w, b)
    check(y, (x.double() @ w.double().t()) + b.double(), K)
    go = randn(M, N, dtype=dtype)
    gi, gw, gb = ops.linear_backward(go, x, w, [True, True, True])
    check(gi, go.double() @ w.double(), N)
    check(gw, go.double().t() @ x.double(), M)
    check(gb, go.double().sum(0), M)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xl", ["contig", "t", "sliced"])
@pytest.mark.parametrize("wl", ["contig", "t", "sliced"])
@pytest.mark.parametrize("M,N,K", [(37, 45, 300), (3, 70, 19), (70, 3, 40)])
def test_linear_layouts(isa, dtype, xl, wl, M, N, K):
    x, w, b = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(N, dtype=dtype)
    go = randn(M, N, dtype=dtype)
    xs, ws, gos = layout(x, xl), layout(w, wl), layout(go, xl)
    check(ops.linear_forward(xs, ws, b), x.double() @ w.double().t() + b.double(), K)
    gi, gw, gb = ops.linear_backward(gos, xs, ws, [True, True, True])
    check(gi, go.double() @ w.double(), N)
    check(gw, go.double().t() @ x.double(), M)
    check(gb, go.double().sum(0), M)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_expanded(isa, dtype):
    # stride-0 operands: every row of x (and of grad_output) is the same
    M, N, K = 50, 40, 70
    x = randn(1, K, dtype=dtype).expand(M, K)
    w = randn(N, 1, dtype=dtype).expand(N, K)
    go = randn(1, N, dtype=dtype).expand(M, N)
    check(ops.linear_forward(x, w, None), x.double() @ w.double().t(), K)
    gi, gw, gb = ops.linear_backward(go, x, w, [True, True, True])
    check(gi, go.double() @ w.double(), N)
    check(gw, go.double().t() @ x.double(), M)
    check(gb, go.double().sum(0), M)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 4096, 64), (64, 4100, 33), (33, 9, 1000), (300, 400, 520)])
def test_linear_backward_shapes(isa, dtype, M, N, K):
    x, w, go = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(M, N, dtype=dtype)
    gi, gw, gb = ops.linear_backward(go, x, w, [True, True, True])
    check(gi, go.double() @ w.double(), N)
    check(gw, go.double().t() @ x.double(), M)
    check(gb, go.double().sum(0), M)
    gi2, gw2, gb2 = ops.linear_backward(go, x, w, [False, True, False])
    assert gi2.shape == (0,) and gb2.shape == (0,)
    torch.testing.assert_close(gw2, gw, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cl", ["contig", "t", "sliced"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (23, 37, 41), (150, 90, 270), (7, 300, 0),
                                   (300, 70, 1)])  # K == 1: the rank-1 path
def test_gemm_core(isa, dtype, cl, accumulate, M, N, K):
    a, b = layout(randn(M, K, dtype=dtype), "t"), layout(randn(K, N, dtype=dtype), "sliced")
    c0 = randn(M, N, dtype=dtype)
    bm, bn = randn(M, dtype=dtype), randn(N, dtype=dtype)
    for bias_m, bias_n in [(None, None), (bm, None), (None, bn), (bm, bn)]:
        c = layout(c0.clone(), cl)
        gemm_(a, b, c, accumulate, bias_m, bias_n)
        ref = a.double() @ b.double()
        if accumulate:
            ref = ref + c0.double()
        if bias_m is not None:
            ref = ref + bm.double()[:, None]
        if bias_n is not None:
            ref = ref + bn.double()[None, :]
        check(c, ref, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prepack", [1, 2, 3])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (40, 50, 1), (23, 37, 41), (150, 90, 270),
                                   (13, 600, 530), (300, 17, 700)])
def test_gemm_core_prepacked(isa, dtype, prepack, M, N, K):
    """A and/or B packed once up front (as conv packs its weight) give the
    same C as packing inside the call; K > KC and ragged M, N edges included."""
    a, b = layout(randn(M, K, dtype=dtype), "t"), layout(randn(K, N, dtype=dtype), "sliced")
    c0 = randn(M, N, dtype=dtype)
    bm, bn = randn(M, dtype=dtype), randn(N, dtype=dtype)
    for accumulate in (False, True):
        c, c_ref = c0.clone(), c0.clone()
        gemm_(a, b, c, accumulate, bm, bn, prepack)
        gemm_(a, b, c_ref, accumulate, bm, bn, 0)
        torch.testing.assert_close(c, c_ref, rtol=0, atol=0)
        ref = a.double() @ b.double() + bm.double()[:, None] + bn.double()[None, :]
        check(c, ref + c0.double() if accumulate else ref, K)


def test_gemm_core_nan_not_read_without_accumulate(isa):
    # beta = 0 must overwrite C, not multiply garbage by zero
    a, b = randn(20, 30, dtype=torch.float32), randn(30, 40, dtype=torch.float32)
    c = torch.full((20, 40), float("nan"))
    gemm_(a, b, c, False, None, None)
    check(c, a.double() @ b.double(), 30)


def test_large_threads(isa):
    # several KC / MC / NC blocks and both threads (when there are two)
    M, N, K = 700, 4200, 600 if isa != "scalar" else 100
    x, w = randn(M, K, dtype=torch.float32), randn(N, K, dtype=torch.float32)
    check(ops.linear_forward(x, w, None), x.double() @ w.double().t(), K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("la,lb,lc", [("contig", "contig", "contig"), ("t", "sliced", "contig"),
                                      ("contig", "t", "t")])
def test_gemm_core_shared_panels(isa, dtype, la, lb, lc):
    """Large multi-threaded GEMMs pack the A and B panels once, shared by the
    threads, per K block: ragged M / N edges, several K blocks (the last one
    short), accumulate and both biases must come out as in a single thread."""
    if isa == "scalar":
        M, N, K = 100, 300, 2300  # 6.9e7 multiply-adds (>= 2^26): the portable kernel is slow
    else:
        M, N, K = 301, 517, 777  # 1.2e8 multiply-adds
    a, b = layout(randn(M, K, dtype=dtype), la), layout(randn(K, N, dtype=dtype), lb)
    c0 = randn(M, N, dtype=dtype)
    bm, bn = randn(M, dtype=dtype), randn(N, dtype=dtype)
    ref = a.double() @ b.double() + bm.double()[:, None] + bn.double()[None, :]
    for accumulate in (False, True):
        c = layout(c0.clone(), lc)
        gemm_(a, b, c, accumulate, bm, bn)
        check(c, ref + c0.double() if accumulate else ref, K)
        nt = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            c1 = layout(c0.clone(), lc)
            gemm_(a, b, c1, accumulate, bm, bn)
        finally:
            torch.set_num_threads(nt)
        torch.testing.assert_close(c, c1, rtol=0, atol=0)


@pytest.mark.parametrize("M,N,K", [(5, 6, 9), (6, 100, 33), (16, 17, 40), (64, 256, 784),
                                   (63, 1000, 300), (64, 65, 257), (40, 96, 1)])
def test_linear_small_batch_transposed(isa, M, N, K):
    """Linear forward at batch 5..64 solves C^T = W X^T so the weight is read
    in place; the AVX2 kernel then stores its tiles transposed (full tiles)
    and edge tiles go through the scalar epilogue. Bias, ragged edges, and
    the same bits as the plain path (the products are summed in one order)."""
    x, w, b = randn(M, K, dtype=torch.float32), randn(N, K, dtype=torch.float32), \
        randn(N, dtype=torch.float32)
    y = ops.linear_forward(x, w, b)
    check(y, x.double() @ w.double().t() + b.double(), K)
    c = torch.empty(M, N)
    gemm_(x, w.t().contiguous(), c, False, None, b)  # NN layout: no transposition
    torch.testing.assert_close(y, c, rtol=0, atol=0)
    y2 = torch.full((M, N), 1.5)
    gemm_(x, w.t(), y2, True, None, b)  # accumulate into C on the transposed path
    check(y2, x.double() @ w.double().t() + b.double() + 1.5, K)


@pytest.mark.parametrize("c_major", ["row", "col"])
@pytest.mark.parametrize("nt", [False, True])
def test_gemm_core_writes_only_c(isa, c_major, nt):
    """Every tile edge (M = 1..29 covers each partial row tile of MR = 4, 6
    and 14; N around NR = 8, 16, 32), stored directly, transposed or through
    the temporary tile, writes C and nothing around it: C is a view into a
    NaN-filled buffer whose rest must stay NaN. nt: A and B rows contiguous
    along K (the small-M swap that stores transposed tiles)."""
    K = 7
    for M in list(range(1, 16)) + [27, 28, 29]:
        for N in (16, 32, 33, 64):
            a = randn(M, K, dtype=torch.float32)
            b = randn(N, K, dtype=torch.float32).t() if nt else randn(K, N, dtype=torch.float32)
            big = torch.full((M + 3, N + 5) if c_major == "row" else (N + 5, M + 3), float("nan"))
            c = big[1:M + 1, 2:N + 2] if c_major == "row" else big[2:N + 2, 1:M + 1].t()
            bn = randn(N, dtype=torch.float32)
            gemm_(a, b, c, False, None, bn)
            check(c, a.double() @ b.double() + bn.double(), K)
            outside = torch.ones_like(big, dtype=torch.bool)
            if c_major == "row":
                outside[1:M + 1, 2:N + 2] = False
            else:
                outside[2:N + 2, 1:M + 1] = False
            assert big[outside].isnan().all(), f"M={M} N={N}: wrote outside C"


def test_concurrent_calls(isa):
    # calls from several Python threads at once (thread-local packing buffers)
    x, w = randn(64, 80, dtype=torch.float32), randn(50, 80, dtype=torch.float32)
    ref = x.double() @ w.double().t()
    outs = [None] * 4

    def work(i):
        outs[i] = ops.linear_forward(x, w, None)

    import threading
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for o in outs:
        check(o, ref, 80)


def test_dtype_errors():
    x = torch.ones(3, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.linear_forward(x, x, None)
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.linear_forward(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64), None)
