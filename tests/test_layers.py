"""Every layer against torch.nn: outputs, input and parameter gradients, running
statistics and eval output, in float32, over the constructor options, on every
CPU kernel path (the `isa` fixture)."""
import pytest
import torch

import fastlayers
from helpers import compare_modules

# ---------------------------------------------------------------- Linear
LINEAR_CASES = [
    # (in, out, bias, input shape)
    (7, 3, True, (5, 7)),
    (7, 3, False, (5, 7)),
    (16, 33, True, (16,)),              # 1-D input
    (10, 4, True, (2, 3, 4, 10)),       # leading dimensions
    (64, 17, True, (0, 64)),            # zero-size batch
    (1, 1, True, (3, 1)),
    (129, 65, True, (31, 129)),
    (784, 256, True, (64, 784)),
]


@pytest.mark.parametrize("fin,fout,bias,shape", LINEAR_CASES)
def test_linear(isa, fin, fout, bias, shape):
    ref = torch.nn.Linear(fin, fout, bias=bias)
    ours = fastlayers.Linear(fin, fout, bias=bias)
    compare_modules(ours, ref, torch.randn(shape), atol=2e-4, rtol=2e-4)


def test_linear_noncontiguous_input(isa):
    ref, ours = torch.nn.Linear(12, 5), fastlayers.Linear(12, 5)
    x = torch.randn(12, 9).t()  # transposed view
    compare_modules(ours, ref, x)


# ---------------------------------------------------------------- Conv2d
CONV_CASES = [
    # kwargs, input shape
    (dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 9, 9)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, bias=False), (2, 3, 8, 7)),
    (dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)), (2, 4, 11, 10)),
    (dict(in_channels=4, out_channels=4, kernel_size=3, dilation=2, padding=2), (1, 4, 10, 13)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1), (2, 4, 7, 7)),
    (dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1), (3, 6, 9, 8)),   # depthwise
    (dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, padding=1), (2, 4, 6, 6)),   # depthwise x2
    (dict(in_channels=5, out_channels=7, kernel_size=1), (2, 5, 6, 5)),                        # 1x1
    (dict(in_channels=5, out_channels=7, kernel_size=1, stride=2), (2, 5, 7, 7)),
    (dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"), (2, 3, 9, 8)),        # asymmetric same
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", dilation=2), (2, 3, 9, 8)),
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"), (2, 3, 9, 8)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"), (2, 3, 6, 7)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=2, padding_mode="replicate"), (2, 3, 6, 7)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=(1, 2), padding_mode="circular"), (2, 3, 6, 7)),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (3, 9, 9)),                 # unbatched
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (0, 3, 9, 9)),              # empty batch
    (dict(in_channels=1, out_channels=6, kernel_size=5, padding=2), (4, 1, 28, 28)),            # LeNet conv1
    (dict(in_channels=6, out_channels=16, kernel_size=5), (4, 6, 14, 14)),                      # LeNet conv2
    (dict(in_channels=3, out_channels=8, kernel_size=7, stride=2, padding=3), (1, 3, 32, 32)),  # ResNet stem
    (dict(in_channels=2, out_channels=3, kernel_size=5), (1, 2, 5, 5)),                         # kernel == input
    (dict(in_channels=7, out_channels=11, kernel_size=3, stride=3, padding=1, dilation=(1, 2)), (2, 7, 13, 17)),
]


@pytest.mark.parametrize("kwargs,shape", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv2d(isa, kwargs, shape):
    ref = torch.nn.Conv2d(**kwargs)
    ours = fastlayers.Conv2d(**kwargs)
    compare_modules(ours, ref, torch.randn(shape), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("weight_cl", [False, True])
def test_conv2d_channels_last(isa, weight_cl):
    ref = torch.nn.Conv2d(8, 6, 3, padding=1)
    ours = fastlayers.Conv2d(8, 6, 3, padding=1)
    x = torch.randn(2, 8, 7, 9).to(memory_format=torch.channels_last)
    if weight_cl:
        ref = ref.to(memory_format=torch.channels_last)
        ours = ours.to(memory_format=torch.channels_last)
    yo, yr = compare_modules(ours, ref, x, atol=2e-4, rtol=2e-4)
    assert yo.is_contiguous(memory_format=torch.channels_last)
    assert yr.is_contiguous(memory_format=torch.channels_last)


def test_conv2d_noncontiguous_input(isa):
    ref, ours = torch.nn.Conv2d(3, 4, 3), fastlayers.Conv2d(3, 4, 3)
    x = torch.randn(2, 6, 10, 12)[:, ::2, 1:, ::2]
    compare_modules(ours, ref, x, atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------- MaxPool2d
POOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 1)),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=2, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=2, dilation=(2, 1), padding=1, ceil_mode=True),
    dict(kernel_size=4, stride=3, padding=2),
    dict(kernel_size=3, stride=2, padding=1, return_indices=True),
    dict(kernel_size=2, dilation=2, return_indices=True, ceil_mode=True),
]


@pytest.mark.parametrize("kwargs", POOL_CASES, ids=[str(i) for i in range(len(POOL_CASES))])
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 2, 8, 8), (4, 5, 7)])
def test_max_pool2d(isa, kwargs, shape):
    ref, ours = torch.nn.MaxPool2d(**kwargs), fastlayers.MaxPool2d(**kwargs)
    x = torch.randn(shape)
    yo, yr = compare_modules(ours, ref, x, atol=0, rtol=0)  # a max is exact


def test_max_pool2d_indices_equal_torch(isa):
    x = torch.randn(3, 4, 13, 12)
    for kw in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, dilation=2)):
        yo, io = fastlayers.functional.max_pool2d(x, return_indices=True, **kw)
        yr, ir = torch.nn.functional.max_pool2d(x, return_indices=True, **kw)
        assert torch.equal(io, ir) and io.dtype == torch.int64
        assert torch.equal(yo, yr)


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_layouts(isa, channels_last):
    x = torch.randn(2, 16, 12, 10)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref, ours = torch.nn.MaxPool2d(3, 2, 1), fastlayers.MaxPool2d(3, 2, 1)
    yo, yr = compare_modules(ours, ref, x, atol=0, rtol=0)
    assert yo.stride() == yr.stride()
    xs = torch.randn(2, 16, 12, 20)[..., ::2]  # non-contiguous
    compare_modules(ours, ref, xs, atol=0, rtol=0)


def test_max_pool2d_nan_propagates(isa):
    x = torch.randn(1, 2, 6, 6)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 4, 5] = float("-inf")
    yo = fastlayers.functional.max_pool2d(x, 2)
    yr = torch.nn.functional.max_pool2d(x, 2)
    torch.testing.assert_close(yo, yr, equal_nan=True, atol=0, rtol=0)
    assert torch.isnan(yo[0, 0, 0, 0])


# ---------------------------------------------------------------- BatchNorm2d
BN_CASES = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(bias=False),
]


@pytest.mark.parametrize("kwargs", BN_CASES, ids=[str(i) for i in range(len(BN_CASES))])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 1, 3), (8, 16, 4, 4)])
def test_batch_norm2d(isa, kwargs, shape):
    if "bias" in kwargs:
        import inspect
        if "bias" not in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters:
            pytest.skip("this torch's BatchNorm2d has no bias= argument")
    c = shape[1]
    ref, ours = torch.nn.BatchNorm2d(c, **kwargs), fastlayers.BatchNorm2d(c, **kwargs)
    if ref.weight is not None:  # non-trivial affine parameters
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
    x = torch.randn(shape) * 2 + 0.5
    compare_modules(ours, ref, x, steps=3)  # running stats after 3 steps
    if ref.track_running_stats:
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    ours.eval(); ref.eval()
    compare_modules(ours, ref, torch.randn(shape))


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm2d_layouts(isa, channels_last):
    x = torch.randn(4, 8, 5, 7) * 3 - 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref, ours = torch.nn.BatchNorm2d(8), fastlayers.BatchNorm2d(8)
    yo, yr = compare_modules(ours, ref, x, steps=2)
    assert yo.stride() == yr.stride()
    compare_modules(ours, ref, torch.randn(4, 16, 5, 7)[:, ::2])


def test_batch_norm_large_mean_small_variance(isa):
    x64 = 1e4 + 1e-2 * torch.randn(16, 4, 8, 8, dtype=torch.float64)
    ours = fastlayers.functional.batch_norm(x64.float(), None, None, training=True)
    ref = torch.nn.functional.batch_norm(x64, None, None, training=True)
    # float32 rounding of the input itself is ~1e-3 relative to std 1e-2:
    # compare with the float64 reference on the rounded input.
    ref32 = torch.nn.functional.batch_norm(x64.float().double(), None, None, training=True)
    torch.testing.assert_close(ours.double(), ref32, atol=2e-3, rtol=0)
    assert (ours.double() - ref).abs().max() < 0.2


def test_batch_norm_other_ranks(isa):
    # batch_norm works on (N, C) and (N, C, L) inputs too, like F.batch_norm.
    for shape in [(6, 4), (5, 3, 7)]:
        x = torch.randn(shape)
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        rm2, rv2 = rm.clone(), rv.clone()
        yo = fastlayers.functional.batch_norm(x, rm, rv, training=True)
        yr = torch.nn.functional.batch_norm(x, rm2, rv2, training=True)
        torch.testing.assert_close(yo, yr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rm, rm2); torch.testing.assert_close(rv, rv2)
