"""CUDA kernels of fastlayers vs torch (skipped without a GPU).

References are torch ops run in float64 on the same (rounded) inputs; our
results are compared with a tolerance relative to the reference's largest
magnitude, per dtype. TF32 is off for the whole module.
"""
import itertools

import pytest
import torch
from helpers import CUDA_TOL, bn_params
from helpers import close_cuda as close
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

if torch.cuda.is_available():  # without a GPU every test is skipped; nothing to load
    import fastlayers  # noqa: F401  (registers torch.ops.fastlayers)

ops = torch.ops.fastlayers
DEV = "cuda"
TOL = CUDA_TOL
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old




def rand(*shape, dtype=torch.float32, cl=False):
    t = torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)
    return t.to(memory_format=torch.channels_last) if cl else t


def ref_grads(fn, inputs, grad_out):
    """fn on float64 copies of inputs; returns (output, grads)."""
    xs = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    gs = torch.autograd.grad(out, [x for x in xs if x is not None], grad_out.double())
    it = iter(gs)
    return out.detach(), [None if x is None else next(it) for x in xs]


def test_cuda_kernels_registered():
    assert fastlayers._C.with_cuda()
    for name in ["linear_forward", "linear_backward", "conv2d_forward", "conv2d_backward",
                 "max_pool2d_forward", "max_pool2d_backward", "max_pool2d_indices",
                 "batch_norm_train", "batch_norm_eval", "batch_norm_backward"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlayers::{name}", "CUDA"), name


# ---- Linear ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,bias,transposed", [
    (37, 53, 29, True, False), (64, 128, 96, False, False), (5, 300, 7, True, True),
    (256, 512, 384, True, False), (3000, 16, 24, True, False),
])
def test_linear(dtype, M, K, N, bias, transposed):
    x = rand(K, M, dtype=dtype).t() if transposed else rand(M, K, dtype=dtype)
    w, b = rand(N, K, dtype=dtype), rand(N, dtype=dtype) if bias else None
    y = ops.linear_forward(x, w, b)
    gy = rand(M, N, dtype=dtype)
    ref, (gx_r, gw_r, gb_r) = ref_grads(F.linear, [x, w, b], gy)
    close(y, ref, dtype, "out")
    gx, gw, gb = ops.linear_backward(gy, x, w, [True, True, bias])
    close(gx, gx_r, dtype, "grad_input")
    close(gw, gw_r, dtype, "grad_weight")
    if bias:
        close(gb, gb_r, dtype, "grad_bias")
    else:
        assert gb.shape == (0,)


def test_linear_masks_and_splitk():
    # K of the weight gradient = 8192 rows: split-K path with the ordered reduction.
    x, w, gy = rand(8192, 24), rand(40, 24), rand(8192, 40)
    gx, gw, gb = ops.linear_backward(gy, x, w, [False, True, False])
    assert gx.shape == (0,) and gb.shape == (0,)
    close(gw, gy.double().t() @ x.double(), torch.float32, "grad_weight")


def test_linear_tall():
    # More than 65535 row tiles: computed as the transposed product.
    x, w = rand(4_300_000, 4), rand(3, 4)
    close(ops.linear_forward(x, w, None), x.double() @ w.double().t(), torch.float32, "out")


# ---- Conv2d ----------------------------------------------------------------------

CONV_CASES = [
    # N, C, H, W, K, (R, S), stride, padding, dilation, groups
    (2, 3, 9, 11, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (2, 4, 10, 7, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (1, 6, 8, 8, 6, (3, 3), (2, 2), (1, 1), (1, 1), 6),
    (2, 8, 16, 16, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (3, 5, 12, 13, 7, (5, 5), (3, 2), (2, 2), (2, 1), 1),
    (8, 16, 32, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1),   # split-K weight gradient
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("cl", [False, True])
def test_conv2d(dtype, case, cl):
    N, C, H, W, K, (R, S), st, pad, dil, g = case
    x = rand(N, C, H, W, dtype=dtype, cl=cl)
    w, b = rand(K, C // g, R, S, dtype=dtype), rand(K, dtype=dtype)
    y = ops.conv2d_forward(x, w, b, st, pad, dil, g)
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    gy = rand(*y.shape, dtype=dtype)
    fn = lambda x_, w_, b_: F.conv2d(x_, w_, b_, st, pad, dil, g)  # noqa: E731
    ref, (gx_r, gw_r, gb_r) = ref_grads(fn, [x, w, b], gy)
    close(y, ref, dtype, "out")
    gx, gw, gb = ops.conv2d_backward(gy, x, w, st, pad, dil, g, [True, True, True])
    close(gx, gx_r, dtype, "grad_input")
    close(gw, gw_r, dtype, "grad_weight")
    close(gb, gb_r, dtype, "grad_bias")


def test_conv2d_no_bias_and_masks():
    x, w = rand(2, 4, 8, 8), rand(5, 4, 3, 3)
    y = ops.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1)
    close(y, F.conv2d(x.double(), w.double()), torch.float32, "out")
    gx, gw, gb = ops.conv2d_backward(torch.ones_like(y), x, w, [1, 1], [0, 0], [1, 1], 1,
                                     [True, False, False])
    assert gw.shape == (0,) and gb.shape == (0,) and gx.shape == x.shape


# ---- MaxPool2d -------------------------------------------------------------------

POOL_CASES = [
    # kernel, stride, padding, dilation, ceil_mode
    ((3, 3), (2, 2), (1, 1), (1, 1), False),
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (1, 1), (1, 1), (2, 2), False),
    ((3, 2), (2, 1), (1, 0), (1, 1), True),
    ((3, 3), (2, 2), (0, 0), (1, 1), True),
    ((17, 17), (1, 1), (0, 0), (1, 1), False),   # 289 > 256: int32 offsets
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("cl", [False, True])
def test_max_pool2d(dtype, case, cl):
    k, s, p, d, ceil = case
    x = rand(2, 3, 19, 18, dtype=dtype, cl=cl)
    out, off = ops.max_pool2d_forward(x, k, s, p, d, ceil)
    assert off.dtype == (torch.uint8 if k[0] * k[1] <= 256 else torch.int32)
    fmt = torch.channels_last if cl else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and off.is_contiguous(memory_format=fmt)
    ref, idx_r = F.max_pool2d(x.float(), k, s, p, d, ceil_mode=ceil, return_indices=True)
    assert torch.equal(out.float(), ref)
    idx = ops.max_pool2d_indices(off, x.shape[3], k, s, p, d)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx_r)
    gy = rand(*out.shape, dtype=dtype)
    gx = ops.max_pool2d_backward(gy, off, list(x.shape), k, s, p, d, cl)
    assert gx.is_contiguous(memory_format=fmt)
    xr = x.double().requires_grad_(True)
    F.max_pool2d(xr, k, s, p, d, ceil_mode=ceil).backward(gy.double())
    close(gx, xr.grad, dtype, "grad_input", tol=TOL[dtype] + 1e-6)


def test_max_pool2d_ties_and_nan():
    x = torch.zeros(1, 1, 6, 6, device=DEV)
    x[0, 0, 2, 3] = float("nan")
    out, off = ops.max_pool2d_forward(x, [3, 3], [1, 1], [1, 1], [1, 1], False)
    ref, idx_r = F.max_pool2d(x, 3, 1, 1, return_indices=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert torch.equal(ops.max_pool2d_indices(off, 6, [3, 3], [1, 1], [1, 1], [1, 1]), idx_r)


# ---- BatchNorm ---------------------------------------------------------------------

BN_SHAPES = [((4, 3, 5, 6), False), ((4, 3, 5, 6), True), ((16, 8), False),
             ((2, 4, 3, 4, 5), False), ((32, 16, 24, 24), False)]




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", BN_SHAPES)
def test_batch_norm_train(dtype, shape, cl):
    x = rand(*shape, dtype=dtype, cl=cl) * 2 + 3
    C = shape[1]
    w, b, rm, rv = bn_params(C, dtype, DEV)
    rm_r, rv_r = rm.double().clone(), rv.double().clone()
    y, mean, invstd = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    if cl:
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = rand(*shape, dtype=dtype)
    fn = lambda x_, w_, b_: F.batch_norm(x_, rm_r, rv_r, w_, b_, True, 0.1, 1e-5)  # noqa: E731
    ref, (gx_r, gw_r, gb_r) = ref_grads(fn, [x, w, b], gy)
    close(y, ref, dtype, "out")
    ptol = 1e-9 if dtype == torch.float64 else 1e-5
    close(rm, rm_r, torch.float64, "running_mean", tol=ptol)
    close(rv, rv_r, torch.float64, "running_var", tol=ptol)
    dims = [0] + list(range(2, len(shape)))
    xd = x.double()
    close(mean, xd.mean(dims), torch.float64, "save_mean", tol=ptol)
    close(invstd, (xd.var(dims, unbiased=False) + 1e-5).rsqrt(), torch.float64, "save_invstd",
          tol=ptol)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gx, gw, gb = ops.batch_norm_backward(gy, x, w, mean, invstd, True, [True, True, True])
    close(gx, gx_r, dtype, "grad_input", tol=TOL[dtype] * 5)
    close(gw, gw_r, dtype, "grad_weight", tol=TOL[dtype] * 5)
    close(gb, gb_r, dtype, "grad_bias", tol=TOL[dtype] * 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cl", BN_SHAPES[:4])
def test_batch_norm_eval(dtype, shape, cl):
    x = rand(*shape, dtype=dtype, cl=cl)
    w, b, rm, rv = bn_params(shape[1], dtype, DEV)
    y = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5)
    gy = rand(*shape, dtype=dtype)
    fn = lambda x_, w_, b_: F.batch_norm(x_, rm.double(), rv.double(), w_, b_, False, 0.1, 1e-5)  # noqa: E731
    ref, (gx_r, gw_r, gb_r) = ref_grads(fn, [x, w, b], gy)
    close(y, ref, dtype, "out")
    invstd = (rv.double() + 1e-5).rsqrt().to(rm.dtype)
    gx, gw, gb = ops.batch_norm_backward(gy, x, w, rm, invstd, False, [True, True, True])
    close(gx, gx_r, dtype, "grad_input")
    close(gw, gw_r, dtype, "grad_weight", tol=TOL[dtype] * 5)
    close(gb, gb_r, dtype, "grad_bias", tol=TOL[dtype] * 5)


def test_batch_norm_no_affine_no_stats():
    x = rand(3, 4, 5)
    y, mean, invstd = ops.batch_norm_train(x, None, None, None, None, 0.1, 1e-5)
    close(y, F.batch_norm(x.double(), None, None, training=True), torch.float32, "out")
    gx, gw, gb = ops.batch_norm_backward(torch.ones_like(x), x, None, mean, invstd, True,
                                         [True, False, False])
    assert gw.shape == (0,) and gb.shape == (0,)
    assert gx.abs().max().item() < 1e-4   # d/dx of sum(normalized x) is zero


# ---- gradcheck (float64, through small autograd wrappers) --------------------------

class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return ops.linear_forward(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx, gw, gb = ops.linear_backward(g.contiguous(), x, w, list(ctx.needs_input_grad))
        return tuple(t if need else None for t, need in zip((gx, gw, gb), ctx.needs_input_grad))


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.args = (stride, padding, dilation, groups)
        return ops.conv2d_forward(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:3])
        gx, gw, gb = ops.conv2d_backward(g, x, w, *ctx.args, need)
        return tuple(t if n else None for t, n in zip((gx, gw, gb), need)) + (None,) * 4


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, s, p, d, ceil):
        out, off = ops.max_pool2d_forward(x, k, s, p, d, ceil)
        ctx.save_for_backward(off)
        ctx.args = (list(x.shape), k, s, p, d,
                    x.dim() == 4 and not x.is_contiguous()
                    and x.is_contiguous(memory_format=torch.channels_last))
        return out

    @staticmethod
    def backward(ctx, g):
        (off,) = ctx.saved_tensors
        shape, k, s, p, d, cl = ctx.args
        return (ops.max_pool2d_backward(g, off, shape, k, s, p, d, cl),) + (None,) * 5


class _BN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        y, mean, invstd = ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5)
        ctx.save_for_backward(x, w, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, mean, invstd = ctx.saved_tensors
        need = list(ctx.needs_input_grad)
        gx, gw, gb = ops.batch_norm_backward(g, x, w, mean, invstd, True, need)
        return tuple(t if n else None for t, n in zip((gx, gw, gb), need))


def _d(*shape):
    return torch.randn(*shape, device=DEV, dtype=torch.float64, requires_grad=True)


def test_gradcheck_linear():
    assert torch.autograd.gradcheck(_Linear.apply, (_d(4, 5), _d(3, 5), _d(3)))


def test_gradcheck_conv_grouped_strided_dilated():
    assert torch.autograd.gradcheck(lambda x, w, b: _Conv.apply(x, w, b, [2, 1], [1, 0], [1, 2], 2),
                                    (_d(2, 4, 6, 7), _d(4, 2, 3, 2), _d(4)))


def test_gradcheck_pool_ceil():
    x = torch.randperm(2 * 3 * 7 * 6, device=DEV, dtype=torch.float64).reshape(2, 3, 7, 6)
    assert torch.autograd.gradcheck(lambda x: _Pool.apply(x, [3, 3], [2, 2], [1, 1], [1, 1], True),
                                    (x.requires_grad_(True),))


def test_gradcheck_bn():
    assert torch.autograd.gradcheck(_BN.apply, (_d(4, 3, 3, 2), _d(3), _d(3)))


def test_gradcheck_functional():
    import fastlayers.functional as fl
    gc = torch.autograd.gradcheck
    assert gc(fl.linear, (_d(4, 5), _d(3, 5), _d(3)))
    assert gc(lambda x, w, b: fl.conv2d(x, w, b, 1, 1), (_d(2, 3, 5, 5), _d(4, 3, 3, 3), _d(4)))
    x = torch.randperm(2 * 3 * 7 * 6, device=DEV, dtype=torch.float64).reshape(2, 3, 7, 6)
    assert gc(lambda x: fl.max_pool2d(x, 3, 2, 1), (x.requires_grad_(True),))
    assert gc(lambda x, w, b: fl.batch_norm(x, None, None, w, b, training=True),
              (_d(4, 3, 3, 2), _d(3), _d(3)))


def _net(ns):
    return torch.nn.Sequential(
        ns.Conv2d(3, 16, 3, padding=1), ns.BatchNorm2d(16), torch.nn.ReLU(), ns.MaxPool2d(2),
        ns.Conv2d(16, 8, 3, padding=1, groups=2), torch.nn.ReLU(), torch.nn.Flatten(),
        ns.Linear(8 * 8 * 8, 10))


@pytest.mark.parametrize("cl", [False, True])
def test_modules_match_torch_nn_on_cuda(cl):
    import fastlayers.nn as fnn
    torch.manual_seed(0)
    ref = _net(torch.nn).to(DEV)
    ours = _net(fnn).to(DEV)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(8, 3, 16, 16, device=DEV)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    for train in (True, True, False):
        ref.train(train); ours.train(train)
        yr, yo = ref(x), ours(x)
        close(yo, yr, torch.float32, "output", tol=1e-4)
        yr.square().sum().backward(); yo.square().sum().backward()
        for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
            close(b.grad, a.grad, torch.float32, n, tol=1e-4, floor=1.0)
            a.grad = b.grad = None
    for (n, a), (_, b) in zip(ref.named_buffers(), ours.named_buffers()):
        close(b.float(), a.float(), torch.float32, n, tol=1e-4)


def test_compile_fullgraph_on_cuda():
    import fastlayers.nn as fnn
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _net(fnn).to(DEV)
    comp = _net(fnn).to(DEV)
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16, device=DEV)
    ye, yc = eager(x), compiled(x)
    close(yc, ye, torch.float32, "compiled output", tol=1e-5)
    ye.sum().backward(); yc.sum().backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        close(b.grad, a.grad, torch.float32, n, tol=1e-5)


# ---- opcheck -------------------------------------------------------------------------

def _opcheck_cases():
    x, w, b = rand(6, 5), rand(4, 5), rand(4)
    xc, wc, bc = rand(2, 4, 7, 7), rand(6, 2, 3, 3), rand(6)
    yc = ops.conv2d_forward(xc, wc, bc, [1, 1], [1, 1], [1, 1], 2)
    xp = rand(2, 3, 9, 9)
    _, off = ops.max_pool2d_forward(xp, [3, 3], [2, 2], [1, 1], [1, 1], False)
    xb = rand(4, 3, 5, 5)
    wb, bb, rm, rv = bn_params(3, torch.float32, DEV)
    _, mean, invstd = ops.batch_norm_train(xb, wb, bb, None, None, 0.1, 1e-5)
    return [
        ("linear_forward", (x, w, b)),
        ("linear_backward", (rand(6, 4), x, w, [True, True, True])),
        ("conv2d_forward", (xc, wc, bc, [1, 1], [1, 1], [1, 1], 2)),
        ("conv2d_backward", (torch.randn_like(yc), xc, wc, [1, 1], [1, 1], [1, 1], 2,
                             [True, True, True])),
        ("max_pool2d_forward", (xp, [3, 3], [2, 2], [1, 1], [1, 1], False)),
        ("max_pool2d_backward", (rand(*off.shape), off, list(xp.shape), [3, 3], [2, 2], [1, 1],
                                 [1, 1], False)),
        ("max_pool2d_indices", (off, 9, [3, 3], [2, 2], [1, 1], [1, 1])),
        ("batch_norm_train", (xb, wb, bb, rm, rv, 0.1, 1e-5)),
        ("batch_norm_eval", (xb, wb, bb, rm, rv, 1e-5)),
        ("batch_norm_backward", (rand(4, 3, 5, 5), xb, wb, mean, invstd, True, [True, True, True])),
    ]


def test_opcheck():
    for name, args in _opcheck_cases():
        torch.library.opcheck(getattr(ops, name), args)


# ---- determinism and streams -----------------------------------------------------------

def test_deterministic_backward():
    def run():
        x, w = rand(8, 16, 32, 32), rand(16, 16, 3, 3)
        gy = rand(8, 16, 32, 32)
        outs = list(ops.conv2d_backward(gy, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True]))
        xl, wl, gl = rand(8192, 24), rand(40, 24), rand(8192, 40)
        outs += list(ops.linear_backward(gl, xl, wl, [True, True, True]))
        xb = rand(16, 8, 20, 20)
        wb = torch.rand(8, device=DEV) + 0.5
        _, m, s = ops.batch_norm_train(xb, wb, None, None, None, 0.1, 1e-5)
        outs += [m, s]
        outs += list(ops.batch_norm_backward(rand(16, 8, 20, 20), xb, wb, m, s, True, [True] * 3))
        xp = rand(4, 8, 30, 30)
        o, off = ops.max_pool2d_forward(xp, [3, 3], [1, 1], [1, 1], [1, 1], False)
        outs.append(ops.max_pool2d_backward(rand(*o.shape), off, list(xp.shape), [3, 3], [1, 1],
                                            [1, 1], [1, 1], False))
        outs.append(ops.linear_forward(rand(300, 200, dtype=torch.bfloat16),
                                       rand(100, 200, dtype=torch.bfloat16), None))
        return outs

    torch.manual_seed(0)
    a = run()
    torch.manual_seed(0)
    b = run()
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"output {i} differs between runs"


def test_non_default_stream():
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # A slow producer on s: if our kernels ran on another stream they would race with it.
        big = torch.randn(3072, 3072, device=DEV)
        for _ in range(4):
            big = big @ big
            big = big / big.abs().amax()
        x = big[:64, :96].contiguous()
        w = big[100:132, :96].contiguous()
        y = ops.linear_forward(x, w, None)
        # Fresh data that still depends on the slow chain above.
        xc = torch.randn(2, 4, 16, 16, device=DEV) + big[:1, :1].reshape(1, 1, 1, 1)
        wc = torch.randn(8, 4, 3, 3, device=DEV) + big[1:2, :1].reshape(1, 1, 1, 1)
        yc = ops.conv2d_forward(xc, wc, None, [1, 1], [1, 1], [1, 1], 1)
        yb, _, _ = ops.batch_norm_train(xc, None, None, None, None, 0.1, 1e-5)
        yp, _ = ops.max_pool2d_forward(xc, [2, 2], [2, 2], [0, 0], [1, 1], False)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    close(y, x.double() @ w.double().t(), torch.float32, "linear")
    close(yc, F.conv2d(xc.double(), wc.double(), padding=1), torch.float32, "conv")
    close(yb, F.batch_norm(xc.double(), None, None, training=True), torch.float32, "bn")
    assert torch.equal(yp, F.max_pool2d(xc, 2))


# ---- errors --------------------------------------------------------------------------------

def test_errors():
    x = torch.randn(4, 5, device=DEV)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.linear_forward(x.int(), torch.randn(3, 5, device=DEV).int(), None)
    with pytest.raises(RuntimeError, match="device"):
        ops.linear_forward(x, torch.randn(3, 5), None)
    with pytest.raises(RuntimeError, match="divisible"):
        ops.conv2d_forward(torch.randn(1, 3, 5, 5, device=DEV), torch.randn(4, 1, 3, 3, device=DEV),
                           None, [1, 1], [0, 0], [1, 1], 2)
    with pytest.raises(ValueError, match="pad"):
        ops.max_pool2d_forward(torch.randn(1, 1, 5, 5, device=DEV), [2, 2], [1, 1], [2, 2], [1, 1],
                               False)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "batch_norm", "max_pool2d"])
def test_mixed_devices_raise_like_torch(layer):
    """A parameter on the CPU with a CUDA input (or the reverse) gets the
    exception type torch raises, with a message naming the devices."""
    import fastlayers.nn.functional as FF

    def call(fn, xdev, pdev):
        torch.manual_seed(0)  # the same inputs for torch and for us
        if layer == "linear":
            return fn.linear(torch.randn(4, 8, device=xdev), torch.randn(3, 8, device=pdev))
        if layer == "conv2d":
            return fn.conv2d(torch.randn(2, 3, 8, 8, device=xdev),
                             torch.randn(4, 3, 3, 3, device=pdev))
        if layer == "batch_norm":
            return fn.batch_norm(torch.randn(2, 3, 4, 4, device=xdev), None, None,
                                 torch.ones(3, device=pdev), torch.zeros(3, device=pdev),
                                 training=True)
        x = torch.randn(2, 3, 8, 8, device=xdev)  # max_pool2d has no parameters:
        return fn.max_pool2d(x, 2, return_indices=True)  # it must just work on xdev

    for xdev, pdev in (("cuda", "cpu"), ("cpu", "cuda")):
        if layer == "max_pool2d":
            out, idx = call(FF, xdev, pdev)
            ref, ridx = call(F, xdev, pdev)
            assert out.device.type == xdev and torch.equal(idx.cpu(), ridx.cpu())
            continue
        with pytest.raises(Exception) as theirs:
            call(F, xdev, pdev)
        with pytest.raises(theirs.type) as ours:
            call(FF, xdev, pdev)
        assert "device" in str(ours.value), str(ours.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_like_torch(dtype):
    """Under torch.autocast('cuda'), Linear and Conv2d run our float16 / bfloat16
    kernels (the layers cast as autocast does), BatchNorm and MaxPool take their input's
    dtype: torch.nn's dtypes and numbers, float32 gradients for the parameters."""
    import fastlayers.nn as fnn
    torch.manual_seed(3)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(128, 10)).to(DEV)
    ours = fastlayers.convert(ref)
    x = torch.randn(4, 3, 8, 8, device=DEV)
    outs = []
    for m in (ref, ours):
        m.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            y = m(x)
        y.float().sum().backward()
        outs.append((y, [p.grad.clone() for p in m.parameters()]))
    (y_r, g_r), (y_o, g_o) = outs
    assert y_o.dtype == y_r.dtype == dtype
    close(y_o, y_r, dtype, "output", tol=4 * CUDA_TOL[dtype])
    for i, (a, b) in enumerate(zip(g_o, g_r)):
        assert a.dtype == b.dtype == torch.float32, i
        close(a, b, dtype, f"grad {i}", tol=4 * CUDA_TOL[dtype])
