"""wgmma GEMM (csrc/cuda/gemm_wgmma.cuh, Hopper sm_90a) through Linear, float16 /
bfloat16 (skipped without a GPU; on other GPUs the same checks run on the
fallback kernels).

The wgmma path takes C = A . B^T with both operands K-contiguous: Linear
forward X . W^T, and grad_weight = dY^T . X when dY and X are both stored
transposed. FASTLAYERS_NO_WGMMA=1 (read per call) switches it off, so the
same products also run on the mma.sync kernel (gemm_tc) for comparison;
FASTLAYERS_WGMMA_LOG=1 makes each wgmma launch print one stderr line, which
tells whether the path really ran (it needs the sm_90a image: build with
TORCH_CUDA_ARCH_LIST=9.0a, as benchmarks/gpu_check.sh does; setup.py adds it to a list with 9.0).
On by default since its first GPU run; FASTLAYERS_CUDA_NEW=0 turns it off (the
path-taken test checks that), so every test here pins FASTLAYERS_CUDA_NEW=1.
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
SHAPES = [(128, 64, 256), (129, 72, 257), (1000, 200, 40), (300, 1024, 520), (1, 64, 8),
          (8, 4096, 8), (2000, 136, 2100)]


def hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)




def rand(*shape, dtype):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def forward(M, K, N, dtype, bias, ld=None):
    """x @ w.T (+ b); ld: row stride of x and w (K-contiguous, padded)."""
    ld = ld or K
    x = rand(M, ld, dtype=dtype)[:, :K]
    w = rand(N, ld, dtype=dtype)[:, :K]
    b = rand(N, dtype=dtype) if bias else None
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    return x, w, b, ref



@pytest.fixture(autouse=True)
def _new_cuda_paths(monkeypatch):
    # FASTLAYERS_CUDA_NEW=0 would turn the wgmma GEMM off (csrc/cuda/common.cuh);
    # these tests are about it.
    monkeypatch.setenv("FASTLAYERS_CUDA_NEW", "1")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_wgmma_linear_forward(dtype, M, K, N, bias):
    x, w, b, ref = forward(M, K, N, dtype, bias)
    close(ops.linear_forward(x, w, b), ref, dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,ld", [(64, 13, 32, 16), (130, 100, 257, 104), (77, 1, 9, 8)])
def test_wgmma_k_tail_padded(dtype, M, K, N, ld):
    # K not a multiple of 8 (or of the 64-wide K tile), rows padded to a multiple of 8.
    x, w, b, ref = forward(M, K, N, dtype, True, ld=ld)
    close(ops.linear_forward(x, w, b), ref, dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_large(dtype):
    # 4096^3: the 128 x 256 tile over many waves, with grouped rasterisation.
    x, w, b, ref = forward(4096, 4096, 4096, dtype, True)
    close(ops.linear_forward(x, w, b), ref, dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_grad_weight_transposed(dtype):
    # grad_weight = dY^T . X with dY and X stored transposed: both K-contiguous.
    M, K, N = 304, 200, 130   # M: the row stride of dY^T and X^T, a multiple of 8
    x = rand(K, M, dtype=dtype).t()
    w = rand(N, K, dtype=dtype)
    gy = rand(N, M, dtype=dtype).t()
    gx, gw, gb = ops.linear_backward(gy, x, w, [True, True, True])
    close(gw, gy.double().t() @ x.double(), dtype, "grad_weight")
    close(gx, gy.double() @ w.double(), dtype, "grad_input")
    close(gb, gy.double().sum(0), dtype, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(129, 72, 257), (300, 1024, 520), (2048, 512, 4096)])
def test_wgmma_matches_mma_sync(dtype, M, K, N, monkeypatch):
    x, w, b, ref = forward(M, K, N, dtype, True)
    y = ops.linear_forward(x, w, b)
    monkeypatch.setenv("FASTLAYERS_NO_WGMMA", "1")
    y_tc = ops.linear_forward(x, w, b)
    monkeypatch.delenv("FASTLAYERS_NO_WGMMA")
    close(y, ref, dtype, "wgmma")
    close(y_tc, ref, dtype, "mma.sync")
    close(y, y_tc.double(), dtype, "wgmma vs mma.sync")


@pytest.mark.parametrize("dtype", DTYPES)
def test_wgmma_deterministic(dtype):
    x, w = rand(513, 264, dtype=dtype), rand(2000, 264, dtype=dtype)
    assert torch.equal(ops.linear_forward(x, w, None), ops.linear_forward(x, w, None))


def test_wgmma_path_taken(capfd, monkeypatch):
    # On Hopper the K-major product must run on wgmma (sm_90a image loaded);
    # elsewhere, and with FASTLAYERS_NO_WGMMA=1, never.
    x, w, b, ref = forward(256, 128, 512, torch.bfloat16, True)
    monkeypatch.setenv("FASTLAYERS_WGMMA_LOG", "1")
    capfd.readouterr()
    close(ops.linear_forward(x, w, b), ref, torch.bfloat16, "out")
    torch.cuda.synchronize()
    err = capfd.readouterr().err
    assert ("fastlayers wgmma: M=" in err) == hopper(), err
    monkeypatch.setenv("FASTLAYERS_NO_WGMMA", "1")
    close(ops.linear_forward(x, w, b), ref, torch.bfloat16, "out")
    assert "fastlayers wgmma: M=" not in capfd.readouterr().err
    # FASTLAYERS_CUDA_NEW=0 turns it off.
    monkeypatch.delenv("FASTLAYERS_NO_WGMMA")
    monkeypatch.setenv("FASTLAYERS_CUDA_NEW", "0")
    close(ops.linear_forward(x, w, b), ref, torch.bfloat16, "out")
    assert "fastlayers wgmma: M=" not in capfd.readouterr().err
