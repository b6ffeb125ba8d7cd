import copy

import torch


def assert_close(a, b, atol=1e-4, rtol=1e-4, msg=""):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")


def clone_input(x, requires_grad=True):
    y = x.detach().clone(memory_format=torch.preserve_format)
    y.requires_grad_(requires_grad)
    return y


def compare_modules(ours, ref, x, atol=1e-4, rtol=1e-4, steps=1, check_grads=True):
    """Run ours and the torch.nn reference on the same input; compare outputs,
    input gradients, parameter gradients and buffers."""
    ours.load_state_dict(ref.state_dict())
    for _ in range(steps):
        xo, xr = clone_input(x, check_grads), clone_input(x, check_grads)
        yo, yr = ours(xo), ref(xr)
        if isinstance(yr, tuple):
            for a, b in zip(yo, yr):
                assert_close(a, b, atol, rtol, "output")
            yo, yr = yo[0], yr[0]
        else:
            assert_close(yo, yr, atol, rtol, "output")
        assert yo.shape == yr.shape
        if check_grads and yr.numel() > 0:
            g = torch.randn_like(yr)
            yo.backward(g)
            yr.backward(g)
            assert_close(xo.grad, xr.grad, atol, rtol, "grad_input")
            for (n, po), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
                assert_close(po.grad, pr.grad, atol, rtol, f"grad {n}")
            ours.zero_grad(); ref.zero_grad()
    for (n, bo), (_, br) in zip(ours.named_buffers(), ref.named_buffers()):
        assert_close(bo, br, atol, rtol, f"buffer {n}")
    return yo, yr


# ---- CUDA tests (tests/test_cuda*.py) -----------------------------------------------

# Error bounds relative to max |ref| (float16/bfloat16 against torch in float32).
CUDA_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def close_cuda(ours, ref, dtype, what="", tol=None, floor=1e-3):
    """max |ours - ref| <= tol * max(max |ref|, floor), tol from CUDA_TOL by default."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    tol = CUDA_TOL[dtype] if tol is None else tol
    err = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    scale = max(ref.double().abs().max().item() if ref.numel() else 0.0, floor)
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"

HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def close_half(ours, ref, dtype, what=""):
    """float16/bfloat16 result against a float64 reference: error relative to max |ref|."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = (ours.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-3)
    tol = HALF_TOL[dtype]
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} * {scale:.3e}"


def bn_params(C, dtype, device):
    """weight, bias, running mean and var for a BatchNorm over C channels; float32
    parameters for float16/bfloat16 inputs (as torch keeps them)."""
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (torch.rand(C, device=device) + 0.5).to(pdt)
    b = torch.randn(C, device=device).to(pdt)
    rm = torch.randn(C, device=device).to(pdt)
    rv = (torch.rand(C, device=device) + 0.5).to(pdt)
    return w, b, rm, rv


# The CPU kernel path a run started with (restored after tests that switch
# paths, so FASTLAYERS_ISA=avx2 pytest keeps running AVX2 between them).
DEFAULT_ISA = __import__("os").environ.get("FASTLAYERS_ISA") or "auto"
