"""torch.func transforms (grad, vmap, jacrev) through the layers' autograd.Functions
(setup_context form with generate_vmap_rule; vmap runs our ops per example through
functorch's batched fallback). Results against torch.nn's under the same transforms.
As with torch.nn, BatchNorm's running statistics must not be updated inside a transform
(torch refuses the in-place update of a captured buffer; under vmap our training op,
which updates them in place, is refused by functorch's fallback): the nets use batch
statistics without running ones, or eval mode."""
import warnings

import pytest
import torch
import torch.nn as tnn
from torch.func import functional_call, grad, jacrev, vmap

import fastlayers
import fastlayers.functional as FL
from helpers import assert_close


def _net(lib, track_running_stats=True):
    return lib.Sequential(lib.Conv2d(3, 6, 3, padding=1), lib.BatchNorm2d(6, track_running_stats=track_running_stats),
                          lib.ReLU(), lib.MaxPool2d(2), lib.Flatten(), lib.Linear(6 * 4 * 4, 5))


def _pair(track_running_stats=True):
    torch.manual_seed(0)
    ref = _net(tnn, track_running_stats).double()
    ours = fastlayers.convert(ref)
    return ref, ours


def test_func_grad_matches_torch():
    ref, ours = _pair(track_running_stats=False)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grads = []
    for m in (ref, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}
        grads.append(grad(lambda p: functional_call(m, p, (x,)).square().sum())(params))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert_close(grads[1][k], grads[0][k], atol=1e-10, rtol=1e-10, msg=k)


def test_per_sample_grads_vmap_matches_torch():
    ref, ours = _pair()
    with torch.no_grad():
        ref[1].running_mean.uniform_(-1, 1)
        ref[1].running_var.uniform_(0.5, 2)
    ours = fastlayers.convert(ref.eval())  # BatchNorm in eval mode: running statistics
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    y = torch.randn(5, 5, dtype=torch.float64)
    per_sample = []
    for m in (ref, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, xi, yi):
            return (functional_call(m, p, (xi.unsqueeze(0),)).squeeze(0) - yi).square().sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # functorch's "no batching rule" performance note
            per_sample.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y))
    for k in per_sample[0]:
        assert per_sample[1][k].shape == (5, *dict(ours.named_parameters())[k].shape)
        assert_close(per_sample[1][k], per_sample[0][k], atol=1e-10, rtol=1e-10, msg=k)


def test_jacrev_linear_and_conv():
    torch.manual_seed(1)
    x, w, b = (torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64),
               torch.randn(2, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ja = jacrev(FL.linear, argnums=(0, 1))(x, w, b)
        jr = jacrev(torch.nn.functional.linear, argnums=(0, 1))(x, w, b)
        xc, wc = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
        jca = jacrev(lambda w: FL.conv2d(xc, w, None, 1, 1))(wc)
        jcr = jacrev(lambda w: torch.nn.functional.conv2d(xc, w, None, 1, 1))(wc)
    for a, r in zip(ja, jr):
        assert_close(a, r, atol=1e-12, rtol=1e-12)
    assert_close(jca, jcr, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layer", ["max_pool2d", "batch_norm"])
def test_func_grad_input_of_pool_and_bn(layer):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    if layer == "max_pool2d":
        f_ours = lambda t: FL.max_pool2d(t, 3, 2, 1).sum()  # noqa: E731
        f_ref = lambda t: torch.nn.functional.max_pool2d(t, 3, 2, 1).sum()  # noqa: E731
    else:
        w = torch.rand(3, dtype=torch.float64) + 0.5
        f_ours = lambda t: FL.batch_norm(t, None, None, w, None, training=True).square().sum()  # noqa: E731
        f_ref = lambda t: torch.nn.functional.batch_norm(t, None, None, w, None, training=True).square().sum()  # noqa: E731
    assert_close(grad(f_ours)(x), grad(f_ref)(x), atol=1e-10, rtol=1e-10)


def test_layers_take_the_eager_twin_outside_transforms():
    """Outside torch.func the layers record the ctx-forward twin of each Function (torch
    binds a setup_context Function's arguments by signature on every call); inside a
    transform, the setup_context form itself."""
    import fastlayers.nn as fnn
    lin, x = fnn.Linear(2, 3), torch.randn(1, 2)
    assert type(lin(x).grad_fn).__name__ == "LinearFunctionEagerBackward"
    seen = []
    grad(lambda t: seen.append(type(lin(t).grad_fn).__name__) or lin(t).sum())(x)
    assert seen[0].startswith("LinearFunction") and "Eager" not in seen[0], seen
