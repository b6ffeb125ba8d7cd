"""fastlayers.models: shapes, training, and state_dict twins between fastlayers and torch."""
import pytest
import torch

from fastlayers.models import (DEFAULT_INPUT_SIZE, MODELS, fastlayers_available,
                               fastlayers_status, freeze, get_layers, get_model, head_name,
                               replace_head)
from fastlayers.train import train_one_epoch

HAVE_FL = fastlayers_available()
FL_OK, FL_WHY = fastlayers_status()
needs_fl = pytest.mark.skipif(not FL_OK, reason=FL_WHY)
LAYERS = ["torch", pytest.param("fastlayers", marks=needs_fl)]

# Small inputs each model accepts: (in_channels, image_size).
SMALL = {
    "lenet5": (1, 28), "alexnet": (3, 64), "alexnet_small": (1, 16),
    "vgg11": (3, 16), "vgg11_bn": (1, 16), "vgg16": (1, 16), "vgg16_bn": (3, 16),
    "resnet18": (3, 16), "resnet34": (1, 16),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine's cores are shared; one thread is faster than two fighting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small_model(name, layers, num_classes=10, **kw):
    c, s = SMALL[name]
    return get_model(name, num_classes=num_classes, in_channels=c, layers=layers,
                     image_size=s, **kw), (c, s)


def test_registry():
    assert set(MODELS) == {"lenet5", "alexnet", "alexnet_small", "vgg11", "vgg11_bn", "vgg16",
                           "vgg16_bn", "resnet18", "resnet34"}
    assert set(DEFAULT_INPUT_SIZE) == set(MODELS) == set(SMALL)
    with pytest.raises(ValueError, match="unknown model"):
        get_model("lenet6")
    with pytest.raises(ValueError, match="layers must be"):
        get_model("lenet5", layers="tf")
    assert get_layers("torch") is torch.nn


def test_fastlayers_missing_message():
    if HAVE_FL:
        import fastlayers.nn
        assert get_layers("fastlayers") is fastlayers.nn
    else:
        with pytest.raises(ImportError, match="layers='torch'"):
            get_layers("fastlayers")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shapes(name):
    model, (c, s) = _small_model(name, "torch", num_classes=7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, c, s, s)).shape == (2, 7)


def test_lenet5_is_classic():
    m = get_model("lenet5", layers="torch")
    assert sum(p.numel() for p in m.parameters()) == 61706  # LeNet-5 on 28x28 with padding 2
    assert m.features[0].padding == (2, 2)
    m32 = get_model("lenet5", layers="torch", image_size=32)
    assert m32.features[0].padding == (0, 0)
    assert m32.classifier[1].in_features == 400
    with pytest.raises(ValueError, match="at least"):
        get_model("lenet5", layers="torch", image_size=8)


def test_small_input_variants():
    r = get_model("resnet18", layers="torch", image_size=32)
    assert r.conv1.kernel_size == (3, 3) and isinstance(r.maxpool, torch.nn.Identity)
    r = get_model("resnet18", layers="torch", image_size=224)
    assert r.conv1.kernel_size == (7, 7) and r.conv1.stride == (2, 2)
    r = get_model("resnet18", layers="torch", small_input=True)
    assert r.conv1.kernel_size == (3, 3)
    v = get_model("vgg11", layers="torch", image_size=28)
    assert v.classifier[0].in_features == 512
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in v.features) == 4
    # resnet/vgg state_dict keys are torchvision's
    keys = set(get_model("resnet18", layers="torch").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.num_batches_tracked", "fc.bias"} <= keys


# The 224-px AlexNet has 57M parameters: a few Adam steps cost seconds of CPU.
TRAIN_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n == "alexnet" else n
               for n in sorted(MODELS)]


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("name", TRAIN_NAMES)
def test_trains_a_few_steps(name, layers):
    """Loss on a fixed batch goes down over a few steps of train_one_epoch (dropout off,
    so that the trend is not noise)."""
    torch.manual_seed(0)
    kw = {"dropout": 0.0} if name.startswith(("alexnet", "vgg")) else {}
    model, (c, s) = _small_model(name, layers, num_classes=4, **kw)
    n, steps = 4, 5
    x, y = torch.randn(n, c, s, s), torch.arange(n) % 4
    loader = [(x, y)] * steps
    opt = torch.optim.Adam(model.parameters(), lr=1e-4 if name.startswith("alexnet") else 1e-3)
    out = train_one_epoch(model, "cpu", loader, opt, epoch=1)
    losses = out["step_losses"]
    assert len(losses) == steps and out["images"] == steps * n
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses


@needs_fl
@pytest.mark.parametrize("name", sorted(MODELS))
def test_uses_fastlayers_modules(name):
    import fastlayers.nn as fnn
    model, _ = _small_model(name, "fastlayers")
    kinds = {type(m) for m in model.modules()}
    assert fnn.Conv2d in kinds and fnn.Linear in kinds
    assert torch.nn.Conv2d not in kinds and torch.nn.Linear not in kinds
    if name.endswith("_bn") or name.startswith("resnet"):
        assert fnn.BatchNorm2d in kinds and torch.nn.BatchNorm2d not in kinds


def _randomize_bn_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@needs_fl
@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_twins(name):
    """fastlayers and torch builds have identical state_dict keys/shapes; weights move
    both ways and give the same outputs (eval mode)."""
    torch.manual_seed(1)
    fast, (c, s) = _small_model(name, "fastlayers")
    torch.manual_seed(2)
    ref, _ = _small_model(name, "torch")
    sf, sr = fast.state_dict(), ref.state_dict()
    assert list(sf) == list(sr)
    assert all(sf[k].shape == sr[k].shape for k in sf)
    x = torch.randn(2, c, s, s)
    for src, dst in ((fast, ref), (ref, fast)):
        with torch.no_grad():
            _randomize_bn_stats(src)
        dst.load_state_dict(src.state_dict())
        src.eval(), dst.eval()
        with torch.no_grad():
            a, b = src(x), dst(x)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_head_and_freeze():
    m = get_model("lenet5", layers="torch")
    assert head_name(m) == "classifier.5"
    assert head_name(get_model("resnet18", layers="torch", small_input=True)) == "fc"
    old = m.classifier[5]
    assert replace_head(m, 3) == "classifier.5"
    assert m.classifier[5] is not old and m.classifier[5].out_features == 3
    assert type(m.classifier[5]) is type(old)
    n = freeze(m, "features")
    assert n == 4
    assert not any(p.requires_grad for p in m.features.parameters())
    assert all(p.requires_grad for p in m.classifier.parameters())
    m2 = get_model("resnet18", layers="torch", small_input=True)
    freeze(m2, "backbone")
    assert [n for n, p in m2.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match="matched no parameters"):
        freeze(m2, "features")


@pytest.mark.slow
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn", "vgg16", "resnet18", "resnet34"])
def test_imagenet_size_step(name, layers):
    """The 224x224 variants: one forward/backward/step at their design size."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=5, in_channels=3, layers=layers, image_size=224)
    if name.startswith("vgg"):
        assert model.classifier[0].in_features == 512 * 7 * 7
    elif name.startswith("resnet"):
        assert model.conv1.kernel_size == (7, 7)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([0, 3])
    out = train_one_epoch(model, "cpu", [(x, y)] * 2, opt, epoch=1)
    assert all(torch.isfinite(torch.tensor(out["step_losses"])))
