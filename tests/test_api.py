"""The drop-in promise: modules are torch.nn's in everything but the kernels."""
import inspect
import re

import pytest
import torch

import fastlayers
import fastlayers.nn as fnn
from helpers import DEFAULT_ISA, assert_close

LAYERS = [
    (fastlayers.Linear, torch.nn.Linear, (6, 4), (3, 6)),
    (fastlayers.Conv2d, torch.nn.Conv2d, (3, 5, 3), (2, 3, 8, 8)),
    (fastlayers.MaxPool2d, torch.nn.MaxPool2d, (2,), (2, 3, 8, 8)),
    (fastlayers.BatchNorm2d, torch.nn.BatchNorm2d, (3,), (2, 3, 8, 8)),
]


@pytest.mark.parametrize("ours_cls,ref_cls,args,shape", LAYERS)
def test_subclass_signature_repr(ours_cls, ref_cls, args, shape):
    ours, ref = ours_cls(*args), ref_cls(*args)
    assert isinstance(ours, ref_cls)
    assert inspect.signature(ours_cls.__init__) == inspect.signature(ref_cls.__init__)
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())


@pytest.mark.parametrize("ours_cls,ref_cls,args,shape", LAYERS)
def test_state_dict_round_trip(ours_cls, ref_cls, args, shape):
    ref = ref_cls(*args)
    ours = ours_cls(*args)
    ours.load_state_dict(ref.state_dict())            # torch -> fastlayers
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    back = ref_cls(*args)
    back.load_state_dict(ours.state_dict())            # fastlayers -> torch
    x = torch.randn(shape)
    ours.eval(); back.eval()
    assert_close(ours(x), back(x))


def test_batchnorm_old_state_dict_without_num_batches_tracked():
    ref = torch.nn.BatchNorm2d(3)
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    ours = fastlayers.BatchNorm2d(3)
    ours._version = ref._version
    # torch's versioning fills the missing counter for old (version < 2) checkpoints
    ours._load_from_state_dict(sd, "", {"version": 1}, True, [], [], [])
    assert ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("ours_cls,ref_cls,args,shape", LAYERS)
def test_hooks_fire(ours_cls, ref_cls, args, shape):
    m = ours_cls(*args)
    calls = []
    m.register_forward_pre_hook(lambda mod, inp: calls.append("pre"))
    m.register_forward_hook(lambda mod, inp, out: calls.append("fwd"))
    m.register_full_backward_hook(lambda mod, gi, go: calls.append("bwd"))
    x = torch.randn(shape, requires_grad=True)
    m(x).sum().backward()
    assert calls == ["pre", "fwd", "bwd"]


@pytest.mark.parametrize("ours_cls,ref_cls,args,shape", LAYERS)
def test_no_grad_saves_nothing(ours_cls, ref_cls, args, shape):
    m = ours_cls(*args)
    with torch.no_grad():
        y = m(torch.randn(shape, requires_grad=True))
    assert y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("layer,channels_last", [("linear", False), ("conv2d", False),
                                                  ("conv2d", True)])
@pytest.mark.parametrize("frozen", ["weight", "input"])
def test_saves_only_what_backward_needs(layer, frozen, channels_last):
    """A frozen weight keeps no activation (dX needs only W); an input that
    needs no grad keeps no weight (dW needs only X). Gradients still match."""
    torch.manual_seed(0)
    if layer == "linear":
        ours, ref = fnn.Linear(16, 8), torch.nn.Linear(16, 8)
        x = torch.randn(5, 16)
    else:
        ours, ref = fnn.Conv2d(4, 6, 3, padding=1), torch.nn.Conv2d(4, 6, 3, padding=1)
        x = torch.randn(2, 4, 7, 7)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    ref.load_state_dict(ours.state_dict())
    for m in (ours, ref):
        m.weight.requires_grad_(frozen != "weight")
    x_ours = x.clone().requires_grad_(frozen != "input")
    x_ref = x.clone().requires_grad_(frozen != "input")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ours(x_ours)
    kept = {id(t) for t in saved}
    absent = x_ours if frozen == "weight" else ours.weight
    assert all(t is not absent for t in saved) and id(absent) not in kept
    assert len(saved) == 1, [tuple(t.shape) for t in saved]
    g = torch.randn_like(y)
    y.backward(g)
    y_ref = ref(x_ref)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref)
    if frozen == "weight":
        torch.testing.assert_close(x_ours.grad, x_ref.grad)
        assert ours.weight.grad is None
        if channels_last:
            assert x_ours.grad.is_contiguous(memory_format=torch.channels_last)
    else:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        assert x_ours.grad is None
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def _net(ns):
    return torch.nn.Sequential(
        ns.Conv2d(3, 8, 3, padding=1), ns.BatchNorm2d(8), torch.nn.ReLU(), ns.MaxPool2d(2),
        torch.nn.Flatten(), ns.Linear(8 * 4 * 4, 5))


def test_convert_keeps_everything():
    torch.manual_seed(1)
    model = _net(torch.nn)
    model(torch.randn(4, 3, 8, 8))  # move BN running stats
    model.eval()
    fired = []
    model[0].register_forward_hook(lambda *a: fired.append(1))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    conv = fastlayers.convert(model)
    assert conv is not model
    assert type(model[0]) is torch.nn.Conv2d  # original untouched
    assert [type(m) for m in conv] == [fastlayers.Conv2d, fastlayers.BatchNorm2d, torch.nn.ReLU,
                                       fastlayers.MaxPool2d, torch.nn.Flatten, fastlayers.Linear]
    assert not conv.training
    for (k, a), (_, b) in zip(conv.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    fired.clear()
    assert_close(conv(x), expected)
    assert fired == [1]
    same = fastlayers.convert(model, inplace=True)
    assert same is model and type(model[0]) is fastlayers.Conv2d


def test_nn_namespace_mirrors_torch_nn():
    for name in dir(torch.nn):
        if not name.startswith("_"):
            assert hasattr(fnn, name), name
    assert fnn.Conv2d is fastlayers.Conv2d and fnn.Linear is fastlayers.Linear
    assert fnn.MaxPool2d is fastlayers.MaxPool2d and fnn.BatchNorm2d is fastlayers.BatchNorm2d
    assert fnn.ReLU is torch.nn.ReLU and fnn.Module is torch.nn.Module
    assert fnn.functional.conv2d is fastlayers.functional.conv2d
    assert fnn.functional.relu is torch.nn.functional.relu
    for name in ("batch_norm",):  # a plain Python function in torch: same signature
        ours = inspect.signature(getattr(fastlayers.functional, name)).parameters
        ref = inspect.signature(getattr(torch.nn.functional, name)).parameters
        assert list(ours) == list(ref), name
    # linear and conv2d are builtins in torch (no inspectable signature): call
    # both with torch's documented keyword names and compare.
    F, T = fastlayers.functional, torch.nn.functional
    x, w, b = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4)
    assert_close(F.linear(input=x, weight=w, bias=b), T.linear(input=x, weight=w, bias=b))
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 2, 3, 3)
    kw = dict(input=x, weight=w, bias=b, stride=1, padding=1, dilation=1, groups=2)
    assert_close(F.conv2d(**kw), T.conv2d(**kw))
    kw = dict(input=x, kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=True,
              return_indices=True)  # torch's max_pool2d is a (*args, **kwargs) dispatcher
    for a, b in zip(F.max_pool2d(**kw), T.max_pool2d(**kw)):
        assert torch.equal(a, b)


def test_thread_count_governs_our_kernels():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fastlayers._C.probe_threads(64) == 1
        if __import__("os").cpu_count() >= 2:
            torch.set_num_threads(2)
            assert fastlayers._C.probe_threads(64) == 2
    finally:
        torch.set_num_threads(old)


FORBIDDEN = re.compile(r"^aten::_*(mm|addmm|bmm|baddbmm|matmul|linear|addmv|mv|dot|"
                       r".*conv.*|.*max_pool.*|.*batch_norm.*|im2col|col2im|unfold.*|mkldnn.*)$")


def test_profiler_sees_no_aten_layer_ops():
    model = _net(fnn)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    with torch.profiler.profile() as prof:
        model(x).sum().backward()
        model.eval()
        model(x).sum().backward()
    names = {e.name for e in prof.events()}
    ours = {n for n in names if n.startswith("fastlayers::")}
    assert {"fastlayers::conv2d_forward", "fastlayers::conv2d_backward",
            "fastlayers::batch_norm_train", "fastlayers::batch_norm_eval",
            "fastlayers::max_pool2d_backward", "fastlayers::linear_backward"} <= ours, ours
    bad = sorted(n for n in names if FORBIDDEN.match(n))
    assert not bad, bad
    # the regex does catch what torch.nn itself runs
    with torch.profiler.profile() as prof:
        _net(torch.nn)(x).sum().backward()
    assert any(FORBIDDEN.match(e.name) for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64])
def test_unsupported_dtype_is_clear(dtype):  # (float16 / bfloat16: test_reduced_precision.py)
    x = torch.ones(2, 4, dtype=dtype)
    w = torch.ones(3, 4, dtype=dtype)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        fastlayers.functional.linear(x, w)


def test_dtype_mismatch_like_torch():
    x, w = torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        torch.nn.functional.linear(x, w)
    with pytest.raises(RuntimeError, match="dtype"):
        fastlayers.functional.linear(x, w)


BAD = [
    ("conv channel mismatch", lambda F: F.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3))),
    ("conv kernel too large", lambda F: F.conv2d(torch.randn(1, 3, 4, 4), torch.randn(4, 3, 5, 5))),
    ("conv wrong dims", lambda F: F.conv2d(torch.randn(3, 8), torch.randn(4, 3, 3, 3))),
    ("conv groups mismatch", lambda F: F.conv2d(torch.randn(1, 4, 8, 8), torch.randn(6, 2, 3, 3), groups=4)),
    ("conv same strided", lambda F: F.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), stride=2, padding="same")),
    ("conv bad padding string", lambda F: F.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), padding="full")),
    ("pool padding over half kernel", lambda F: F.max_pool2d(torch.randn(1, 3, 8, 8), 2, padding=2)),
    ("pool wrong dims", lambda F: F.max_pool2d(torch.randn(8, 8), 2)),
    ("pool output too small", lambda F: F.max_pool2d(torch.randn(1, 1, 2, 2), 3)),
    ("pool zero stride", lambda F: F.max_pool2d(torch.randn(1, 1, 4, 4), 2, stride=0)),
    ("bn one value per channel", lambda F: F.batch_norm(torch.randn(1, 3, 1, 1), None, None, training=True)),
    ("bn channel mismatch", lambda F: F.batch_norm(torch.randn(2, 3, 4, 4), torch.zeros(4), torch.ones(4))),
    ("linear shape mismatch", lambda F: F.linear(torch.randn(2, 5), torch.randn(3, 4))),
    ("pool string kernel", lambda F: F.max_pool2d(torch.randn(1, 1, 4, 4), "2")),
]


@pytest.mark.parametrize("name,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_like_torch(name, call):
    with pytest.raises(Exception) as ref:
        call(torch.nn.functional)
    with pytest.raises(Exception) as ours:
        call(fastlayers.functional)
    assert type(ours.value) is type(ref.value), (ours.value, ref.value)
    assert str(ours.value)


def test_reflect_padding_too_large_like_torch():
    for ns in (torch.nn, fnn):
        m = ns.Conv2d(1, 1, 3, padding=4, padding_mode="reflect")
        with pytest.raises(RuntimeError, match="[Pp]adding size should be less"):
            m(torch.randn(1, 1, 3, 3))


def test_wrong_type_names_parameter():
    with pytest.raises(TypeError, match="kernel_size"):
        fastlayers.functional.max_pool2d(torch.randn(1, 1, 4, 4), "2")
    with pytest.raises(TypeError, match="stride"):
        fastlayers.functional.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 2, 2), stride=1.5)
    with pytest.raises(TypeError, match="input"):
        fastlayers.functional.linear([1.0, 2.0], torch.randn(2, 2))


@pytest.mark.parametrize("ours_cls,ref_cls,args,shape", LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_double_backward_matches_torch(ours_cls, ref_cls, args, shape, train):
    """create_graph=True (a gradient penalty: the norm of d out / d x, then
    its gradient): the second-order gradients equal torch.nn's, for the input
    and every parameter, in training and eval mode."""
    torch.manual_seed(0)
    ref = ref_cls(*args).double().train(train)
    ours = ours_cls(*args).double().train(train)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    if ours_cls is fastlayers.MaxPool2d:
        x = x.reshape(-1)[torch.randperm(x.numel())].reshape(shape)  # no ties
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (g,) = torch.autograd.grad((y * torch.sin(y)).sum(), xi, create_graph=True)
        penalty = (g.pow(2).sum() - 1).pow(2)
        params = [p for p in m.parameters()]
        grads.append(torch.autograd.grad(penalty, [xi] + params, allow_unused=True))
    assert len(grads[0]) == len(grads[1])
    for gr, go in zip(*grads):
        if gr is None:
            assert go is None or torch.count_nonzero(go) == 0
            continue
        torch.testing.assert_close(go, gr, rtol=1e-9, atol=1e-10)


_F = fastlayers.functional
_D = torch.float64


def _t(*shape, cl=False):
    t = torch.randn(*shape, dtype=_D)
    if cl:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_()


@pytest.mark.parametrize("name,fn,inputs", [
    ("linear", lambda x, w, b: _F.linear(x, w, b), lambda: (_t(4, 5), _t(3, 5), _t(3))),
    ("linear_3d", lambda x, w: _F.linear(x, w), lambda: (_t(2, 3, 5), _t(4, 5))),
    ("conv_strided_dilated_grouped", lambda x, w, b: _F.conv2d(x, w, b, (2, 1), (1, 0), (1, 2), 2),
     lambda: (_t(2, 4, 7, 6), _t(6, 2, 3, 3), _t(6))),
    ("conv_channels_last", lambda x, w: _F.conv2d(x, w, None, 1, 1),
     lambda: (_t(2, 3, 5, 6, cl=True), _t(4, 3, 3, 3))),
    ("pool_k3s2p1", lambda x: _F.max_pool2d(x, 3, 2, 1), lambda: (_t(2, 3, 7, 8),)),
    ("pool_dilated_ceil", lambda x: _F.max_pool2d(x, 2, 2, 1, 2, True), lambda: (_t(2, 3, 7, 8),)),
    ("pool_channels_last", lambda x: _F.max_pool2d(x, 2), lambda: (_t(2, 3, 6, 6, cl=True),)),
    ("bn_train", lambda x, w, b: _F.batch_norm(x, None, None, w, b, True),
     lambda: (_t(4, 3, 5, 5), _t(3), _t(3))),
    ("bn_eval", lambda x, w, b, rm=torch.randn(3, dtype=_D), rv=torch.rand(3, dtype=_D) + 0.5:
     _F.batch_norm(x, rm, rv, w, b, False),
     lambda: (_t(4, 3, 5, 5), _t(3), _t(3))),
    ("bn_no_affine_2d", lambda x: _F.batch_norm(x, None, None, None, None, True),
     lambda: (_t(6, 4),)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_gradgradcheck(name, fn, inputs):
    """Second derivatives (float64, numerical check) of every layer."""
    torch.manual_seed(0)
    assert torch.autograd.gradgradcheck(fn, inputs())


def test_third_order_conv():
    """The grad_input / grad_weight Functions are each other's derivatives,
    so a third derivative works too."""
    torch.manual_seed(0)
    x, w = _t(1, 2, 5, 5), _t(3, 2, 3, 3)
    f = lambda x, w: _F.conv2d(x, w, None, 1, 1).pow(2)  # noqa: E731
    assert torch.autograd.gradgradcheck(
        lambda x, w: torch.autograd.grad(f(x, w).sum(), (x, w), create_graph=True), (x, w))


def test_build_info():
    info = fastlayers.build_info()
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert isinstance(info["cuda_kernels"], bool)


def _amd_family():
    """The CPU's AMD family from /proc/cpuinfo, or None (not AMD / unreadable)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if "AuthenticAMD" not in text:
        return None
    for line in text.splitlines():
        if line.startswith("cpu family"):
            return int(line.split(":")[1])
    return None


def test_gemm_isa():
    """The GEMM runs the active path, except AVX2 under an automatic AVX-512
    choice on AMD family 25 (Zen 4); forcing a path forces the GEMM's too."""
    try:
        for name in fastlayers._C.supported_isas():
            fastlayers.set_isa(name)
            assert fastlayers._C.gemm_isa() == name
        fastlayers.set_isa("auto")
        auto = fastlayers.isa()
        split = auto == "avx512" and _amd_family() == 25
        assert fastlayers._C.gemm_isa() == ("avx2" if split else auto)
        assert fastlayers.build_info()["cpu_gemm_isa"] == fastlayers._C.gemm_isa()
    finally:
        fastlayers.set_isa(DEFAULT_ISA)


def _setup_function(name):
    """One function of setup.py, compiled on its own (importing setup.py would
    run setup())."""
    import ast
    import os
    import pathlib
    src = (pathlib.Path(__file__).parent.parent / "setup.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"os": os}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "setup.py", "exec"), ns)
    return ns


@pytest.mark.parametrize("archs,cuda,flag,expected", [
    ("8.0;9.0", "13.0", None, "8.0;9.0;9.0a"),
    ("9.0+PTX", "12.4", None, "9.0+PTX;9.0a"),
    ("8.0;9.0", "11.8", None, "8.0;9.0"),          # no sm_90a before CUDA 12
    ("8.0;9.0", "13.0", "0", "8.0;9.0"),           # opted out
    ("9.0;9.0a", "13.0", None, "9.0;9.0a"),        # already there
    ("8.0", "13.0", None, "8.0"),                  # no Hopper image asked for
    ("Hopper", "13.0", None, "Hopper"),            # named lists are left alone
])
def test_setup_adds_sm90a(monkeypatch, archs, cuda, flag, expected):
    ns = _setup_function("_add_sm90a")

    class _Version:
        pass

    class _Torch:
        version = _Version()

    _Torch.version.cuda = cuda
    ns["torch"] = _Torch
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    if flag is None:
        monkeypatch.delenv("FASTLAYERS_SM90A", raising=False)
    else:
        monkeypatch.setenv("FASTLAYERS_SM90A", flag)
    ns["_add_sm90a"]()
    import os
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


@pytest.mark.parametrize("ours_cls,ref_cls,args,shape", LAYERS)
def test_no_grad_path_matches_torch(ours_cls, ref_cls, args, shape):
    """Under no_grad the ops are called without the autograd.Function; the
    results (and BatchNorm's running statistics, in train and eval mode) are
    still torch's."""
    torch.manual_seed(0)
    ours, ref = ours_cls(*args), ref_cls(*args)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    for train in (True, False):
        ours.train(train), ref.train(train)
        with torch.no_grad():
            y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, msg=k)
