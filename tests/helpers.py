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
