"""CUDA fast paths of the memory-bound layers (MaxPool2d, BatchNorm2d) on shapes
and layouts that reach them (skipped without a GPU).

MaxPool2d: the tiled NCHW kernels (a block stages a band of rows in shared
memory), the NCHW 3x3 stride-2 backward (a thread per 4 grad_input elements), the channel-vector NHWC kernels (C % (16 / element size) == 0, 16-byte
aligned data) and the fallbacks next to them (misaligned base pointers, C not a
multiple of the vector width, rows too wide for a band). Outputs and indices
must equal torch's bit for bit; grad_input is compared with a float64 reference.
"""
import pytest
import torch
from helpers import CUDA_TOL, bn_params
from helpers import close_cuda as close
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

if torch.cuda.is_available():
    import fastlayers  # noqa: F401  (registers torch.ops.fastlayers)

ops = torch.ops.fastlayers
DEV = "cuda"
TOL = CUDA_TOL
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]




def make(shape, dtype, cl=False, shift=0, ties=False):
    """Random tensor; shift > 0 puts its data `shift` elements past an aligned
    allocation (base pointer not 16-byte aligned)."""
    numel = 1
    for s in shape:
        numel *= s
    if ties:  # few distinct values: many ties inside windows
        flat = torch.randint(-2, 3, (numel + shift,), device=DEV).to(dtype)
    else:
        flat = torch.randn(numel + shift, device=DEV).to(dtype)
    if cl:
        n, c, h, w = shape
        return flat[shift:].view(n, h, w, c).permute(0, 3, 1, 2)
    return flat[shift:].view(*shape)


POOL = [
    # shape, kernel, stride, padding, ceil_mode
    ((2, 3, 112, 112), (3, 3), (2, 2), (1, 1), False),   # ResNet stem pool, several bands
    ((2, 5, 57, 59), (3, 3), (2, 2), (1, 1), True),      # odd H/W, ceil windows
    ((3, 2, 33, 30), (2, 2), (2, 2), (0, 0), True),      # 2x2 specialisation, ceil
    ((2, 3, 20, 21), (3, 2), (1, 2), (1, 1), False),     # generic window, overlapping rows
    ((1, 2, 9, 2500), (3, 3), (1, 1), (1, 1), False),    # wide rows: small bands / fallback
    ((1, 1, 4, 12000), (5, 5), (1, 1), (2, 2), False),   # one band does not fit: fallback
    ((2, 16, 15, 14), (3, 3), (2, 2), (1, 1), True),     # C = 16: NHWC vector path
    ((2, 24, 8, 9), (2, 3), (2, 1), (1, 1), False),
    ((2, 4, 16, 20), (3, 3), (2, 2), (0, 0), False),     # 3x3 stride 2 unpadded, W % 4 == 0
    ((1, 3, 7, 6), (3, 3), (2, 2), (1, 1), True),        # 3x3 stride 2, W % 4 != 0: scalar stores
]



@pytest.fixture(autouse=True, params=["0", "1"], ids=["older", "newest"])
def _new_cuda_paths(request, monkeypatch):
    # FASTLAYERS_CUDA_NEW=0 turns off the newest kernels (the channels_last
    # BatchNorm row kernels, the 3x3/stride-2 MaxPool backward; on by default):
    # every case runs on both, since the older ones still serve other shapes.
    monkeypatch.setenv("FASTLAYERS_CUDA_NEW", request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL)
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shift", [0, 1])
def test_max_pool2d_fast_paths(dtype, case, cl, shift):
    shape, k, s, p, ceil = case
    x = make(shape, dtype, cl, shift, ties=True)
    x[0, 0, 1, 1] = float("nan")
    x[-1, -1, -1, -2] = float("nan")
    out, off = ops.max_pool2d_forward(x, k, s, p, [1, 1], ceil)
    ref, idx_r = F.max_pool2d(x, k, s, p, 1, ceil_mode=ceil, return_indices=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    idx = ops.max_pool2d_indices(off, x.shape[3], k, s, p, [1, 1])
    assert torch.equal(idx, idx_r)
    gy = make(tuple(out.shape), dtype, cl, shift)
    gx = ops.max_pool2d_backward(gy, off, list(x.shape), k, s, p, [1, 1], cl)
    # Reference: scatter-add of grad_output at torch's indices, in float64.
    ref_gx = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], dtype=torch.float64,
                         device=DEV)
    ref_gx.scatter_add_(2, idx_r.flatten(2), gy.double().flatten(2))
    close(gx, ref_gx.view(x.shape), dtype, "grad_input", tol=TOL[dtype] + 1e-6)


def test_max_pool2d_offsets_tensor_misaligned():
    # Backward with grad_output / offsets that start at odd addresses (NCHW band kernel
    # stages them with ragged ends; NHWC falls back to the scalar kernel).
    for cl in (False, True):
        x = make((2, 8, 30, 31), torch.float32, cl, ties=True)
        out, off = ops.max_pool2d_forward(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
        off2 = torch.empty(off.numel() + 3, dtype=off.dtype, device=DEV)[3:]
        gy2 = torch.empty(out.numel() + 1, device=DEV)[1:]
        if cl:
            n, c, h, w = off.shape
            off2 = off2.view(n, h, w, c).permute(0, 3, 1, 2)
            gy2 = gy2.view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            off2 = off2.view(off.shape)
            gy2 = gy2.view(off.shape)
        off2.copy_(off)
        gy2.copy_(torch.randn_like(out))
        a = ops.max_pool2d_backward(gy2, off2, list(x.shape), [3, 3], [2, 2], [1, 1], [1, 1], cl)
        b = ops.max_pool2d_backward(gy2.clone(memory_format=torch.contiguous_format if not cl
                                              else torch.channels_last),
                                    off, list(x.shape), [3, 3], [2, 2], [1, 1], [1, 1], cl)
        assert torch.equal(a, b)


# ---- BatchNorm ---------------------------------------------------------------------
# (32, 16, 24, 24) in tests/test_cuda.py and the shapes below reach the sm_90
# cluster-fused training kernels (dense NCHW, >= 8 channels, S % 8 == 0); C < 8,
# S % VEC != 0 and misaligned NCHW data take the split kernels; channels_last
# data take the NHWC row kernels (scalar units when misaligned or C % VEC != 0).

BN = [
    ((8, 64, 28, 28), False),     # cluster path: 64 channels over >= 8 clusters
    ((3, 24, 10, 12), False),     # per-channel vector count not a multiple of 8 (ranks
                                  # with unequal or empty shares)
    ((2, 9, 1, 8), False),        # 9 channels, 4 vectors each (fp32): most ranks empty
    ((4, 32, 7, 7), False),       # S % VEC != 0: split kernels
    ((2, 4, 16, 16), False),      # C < 8: split kernels
    # channels_last: the NHWC row kernels (16-byte units when C % (16 / size) == 0)
    ((4, 32, 8, 8), True),
    ((4, 3, 10, 10), True),       # scalar units, 85 rows per block iteration
    ((2, 16, 12, 12), True),
    ((8, 64, 28, 28), True),      # many row splits
    ((2, 100, 9, 9), True),       # fp32: 25 units per row (10 rows side by side); fp16: scalar
    ((2, 1040, 3, 3), True),      # more than 256 units per row: two channel chunks (scalar/fp64)
]




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", BN)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train_fast_paths(dtype, shape, cl, affine):
    C = shape[1]
    # Large mean, small spread: the statistics must not cancel catastrophically.
    x = (make(shape, dtype, cl).float() * 0.5 + 100.0).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = bn_params(C, dtype, DEV)
    if not affine:
        w = b = None
    rm_r, rv_r = rm.double().clone(), rv.double().clone()
    y, mean, invstd = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    xd = x.double().requires_grad_(True)
    wd = None if w is None else w.double().requires_grad_(True)
    bd = None if b is None else b.double().requires_grad_(True)
    ref = F.batch_norm(xd, rm_r, rv_r, wd, bd, True, 0.1, 1e-5)
    close(y, ref, dtype, "out", tol=TOL[dtype] * 5)
    ptol = 1e-9 if dtype == torch.float64 else 1e-5
    close(rm, rm_r, torch.float64, "running_mean", tol=ptol)
    close(rv, rv_r, torch.float64, "running_var", tol=max(ptol, 1e-4 if dtype != torch.float64
                                                              else ptol))
    dims = [0] + list(range(2, len(shape)))
    close(mean, xd.detach().mean(dims), torch.float64, "save_mean", tol=ptol)
    close(invstd, (xd.detach().var(dims, unbiased=False) + 1e-5).rsqrt(), torch.float64,
          "save_invstd", tol=1e-9 if dtype == torch.float64 else 1e-4)
    gy = make(shape, dtype, cl)
    gx, gw, gb = ops.batch_norm_backward(gy, x, w, mean, invstd, True, [True, affine, affine])
    grads = torch.autograd.grad(ref, [t for t in (xd, wd, bd) if t is not None], gy.double())
    close(gx, grads[0], dtype, "grad_input", tol=TOL[dtype] * 10)
    if affine:
        close(gw, grads[1], dtype, "grad_weight", tol=TOL[dtype] * 10)
        close(gb, grads[2], dtype, "grad_bias", tol=TOL[dtype] * 10)
    # Bitwise reproducible, and grad_input alone equals grad_input with all grads.
    y2, mean2, invstd2 = ops.batch_norm_train(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)
    assert torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(invstd, invstd2)
    gx2, _, _ = ops.batch_norm_backward(gy, x, w, mean, invstd, True, [True, False, False])
    assert torch.equal(gx, gx2)


def test_batch_norm_cluster_vs_split_kernels(monkeypatch):
    # The fused path and the split kernels agree (to rounding); env switch read per call.
    x = make((8, 64, 28, 28), torch.float32) * 2 + 3
    gy = make((8, 64, 28, 28), torch.float32)
    w, b, rm, rv = bn_params(64, torch.float32, DEV)
    outs = []
    for off in ("0", "1"):
        monkeypatch.setenv("FASTLAYERS_BN_NO_CLUSTER", off)
        y, m, s = ops.batch_norm_train(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)
        outs.append((y, m, s) + tuple(ops.batch_norm_backward(gy, x, w, m, s, True,
                                                              [True, True, True])))
    for a, c in zip(*outs):
        close(a, c, torch.float32, "cluster vs split", tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 16, 64, 100])
@pytest.mark.parametrize("shift", [0, 1])
def test_batch_norm_channels_last(dtype, C, shift):
    # NHWC row kernels, 16-byte units (shift 0, C % VEC == 0) or scalar units
    # (misaligned base pointer); large mean; train, eval and backward vs float64;
    # bitwise repeatable.
    shape = (6, C, 13, 11)
    x = make(shape, dtype, True, shift)
    x.copy_(make(shape, dtype, True).float() * 0.5 + 1000.0)
    assert x.is_contiguous(memory_format=torch.channels_last)
    gy = make(shape, dtype, True, shift)
    w, b, rm, rv = bn_params(C, dtype, DEV)
    rm_r, rv_r = rm.double().clone(), rv.double().clone()
    y, mean, invstd = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    xd = x.double().requires_grad_(True)
    wd, bd = w.double().requires_grad_(True), b.double().requires_grad_(True)
    ref = F.batch_norm(xd, rm_r, rv_r, wd, bd, True, 0.1, 1e-5)
    close(y, ref, dtype, "out", tol=TOL[dtype] * 5)
    ptol = 1e-9 if dtype == torch.float64 else 1e-5
    close(rm, rm_r, torch.float64, "running_mean", tol=ptol)
    close(rv, rv_r, torch.float64, "running_var", tol=1e-9 if dtype == torch.float64 else 1e-4)
    close(mean, xd.detach().mean([0, 2, 3]), torch.float64, "save_mean", tol=ptol)
    close(invstd, (xd.detach().var([0, 2, 3], unbiased=False) + 1e-5).rsqrt(), torch.float64,
          "save_invstd", tol=1e-9 if dtype == torch.float64 else 1e-4)
    gx, gw, gb = ops.batch_norm_backward(gy, x, w, mean, invstd, True, [True, True, True])
    rgx, rgw, rgb = torch.autograd.grad(ref, [xd, wd, bd], gy.double())
    close(gx, rgx, dtype, "grad_input", tol=TOL[dtype] * 10)
    close(gw, rgw, dtype, "grad_weight", tol=TOL[dtype] * 10)
    close(gb, rgb, dtype, "grad_bias", tol=TOL[dtype] * 10)
    y2, mean2, invstd2 = ops.batch_norm_train(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)
    assert torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(invstd, invstd2)
    gx2, gw2, gb2 = ops.batch_norm_backward(gy, x, w, mean, invstd, True, [True, True, True])
    assert torch.equal(gx, gx2) and torch.equal(gw, gw2) and torch.equal(gb, gb2)
    # eval: affine map from the running statistics; backward through it
    ye = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5)
    refe = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False,
                        0.1, 1e-5)
    close(ye, refe, dtype, "eval out", tol=TOL[dtype] * 5)
    gxe, _, _ = ops.batch_norm_backward(gy, x, w, rm, (rv + 1e-5).rsqrt(), False,
                                        [True, False, False])
    refge = gy.double() * (w.double() * (rv.double() + 1e-5).rsqrt()).view(1, C, 1, 1)
    close(gxe, refge, dtype, "eval grad_input", tol=TOL[dtype] * 10)
