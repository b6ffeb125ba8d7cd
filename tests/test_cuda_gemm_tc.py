"""Tensor-core GEMM (csrc/cuda/gemm_tc.cuh) through Linear, float16 / bfloat16
(skipped without a GPU).

Linear forward is X.W^T (both operands K-contiguous), grad_input = dY.W (B
N-contiguous), grad_weight = dY^T.X (A M-contiguous); a transposed input flips
X's layout. The shapes below hit all four operand layouts, edge tiles in M, N
and K, padded (non-contiguous) operands, and layouts the fast path declines
(K = 12, odd strides, a misaligned base), which must fall back and stay correct.
References: float64 on the same rounded inputs; error relative to max |ref|.
"""
import pytest
import torch
from helpers import close_half as close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

if torch.cuda.is_available():  # without a GPU every test is skipped; nothing to load
    import fastlayers  # noqa: F401  (registers torch.ops.fastlayers)

ops = torch.ops.fastlayers
DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _mma_sync_kernel(monkeypatch):
    # On Hopper the wgmma GEMM takes the K-contiguous products first
    # (tests/test_cuda_wgmma.py); these tests are about the mma.sync kernel.
    monkeypatch.setenv("FASTLAYERS_NO_WGMMA", "1")


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def make_input(M, K, dtype, layout):
    """M x K input in one of several memory layouts."""
    if layout == "contiguous":
        return rand(M, K, dtype=dtype)
    if layout == "transposed":                    # M-contiguous, column stride M
        return rand(K, M, dtype=dtype).t()
    if layout == "padded":                        # row stride K + 8 (still qualifies if K % 8 == 0)
        return rand(M, K + 8, dtype=dtype)[:, :K]
    if layout == "padded_transposed":             # M-contiguous, stride rounded up to 8 (+8)
        ld = (M + 7) // 8 * 8 + 8
        return rand(K, ld, dtype=dtype)[:, :M].t()
    if layout == "odd_stride":                    # row stride K + 3: declined
        return rand(M, K + 3, dtype=dtype)[:, :K]
    if layout == "misaligned":                    # base 2 bytes off a 16-byte boundary: declined
        return rand(M * K + 1, dtype=dtype)[1:].view(M, K)
    raise ValueError(layout)


def check_linear(M, K, N, dtype, layout, bias, backward=True):
    x = make_input(M, K, dtype, layout)
    w = rand(N, K, dtype=dtype)
    b = rand(N, dtype=dtype) if bias else None
    xd, wd = x.double(), w.double()
    y = ops.linear_forward(x, w, b)
    ref = xd @ wd.t() + (b.double() if bias else 0)
    close(y, ref, dtype, "out")
    if not backward:
        return
    gy = rand(M, N, dtype=dtype)
    gx, gw, gb = ops.linear_backward(gy, x, w, [True, True, bias])
    close(gx, gy.double() @ wd, dtype, "grad_input")
    close(gw, gy.double().t() @ xd, dtype, "grad_weight")
    if bias:
        close(gb, gy.double().sum(0), dtype, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(128, 64, 256), (129, 72, 257), (1000, 200, 40), (8, 4096, 8),
                                   (37, 48, 29), (300, 1024, 520)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "padded", "padded_transposed"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_tc(dtype, M, K, N, layout, bias):
    check_linear(M, K, N, dtype, layout, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_tc_large(dtype):
    # 4096^3: the big-tile path over many waves, with grouped rasterisation.
    check_linear(4096, 4096, 4096, dtype, "contiguous", True, backward=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,layout", [
    (64, 12, 32, "contiguous"),      # K = 12: row stride not a multiple of 8
    (96, 64, 48, "odd_stride"),
    (96, 64, 48, "misaligned"),
    (33, 40, 17, "transposed"),      # column stride 33
])
def test_linear_tc_declined(dtype, M, K, N, layout):
    check_linear(M, K, N, dtype, layout, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_tc_deterministic(dtype):
    x, w = rand(513, 264, dtype=dtype), rand(200, 264, dtype=dtype)
    y1 = ops.linear_forward(x, w, None)
    y2 = ops.linear_forward(x, w, None)
    assert torch.equal(y1, y2)
