"""torch.compile(fullgraph=True) of a net using all four layers: same outputs
and gradients as eager, no graph break; torch.export traces it too."""
import pytest
import torch

import fastlayers.nn as nn
from helpers import assert_close


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("train", [True, False])
def test_compile_fullgraph_matches_eager(train):
    torch._dynamo.reset()
    eager, comp = Net(), Net()
    comp.load_state_dict(eager.state_dict())
    eager.train(train); comp.train(train)
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        assert_close(yc, ye)
        ye.square().sum().backward(); yc.square().sum().backward()
        for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
            assert_close(b.grad, a.grad, msg=n)
    for (n, a), (_, b) in zip(eager.named_buffers(), comp.named_buffers()):
        assert_close(b, a, msg=n)


def test_compile_under_autocast():
    """bfloat16 autocast inside the compiled graph (our layers apply autocast's rule
    themselves: torch.is_autocast_enabled is traced, no graph break)."""
    torch._dynamo.reset()
    eager, comp = Net(), Net()
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ye, yc = eager(x), compiled(x)
    assert ye.dtype == yc.dtype == torch.bfloat16
    assert torch.equal(ye, yc)
    ye.float().sum().backward()
    yc.float().sum().backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        assert a.grad.dtype == torch.float32, n
        assert_close(b.grad, a.grad, rtol=1e-2, atol=1e-2, msg=n)


def test_compile_inductor_forward():
    torch._dynamo.reset()
    m = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    try:
        compiled = torch.compile(m, fullgraph=True)
        y = compiled(x)
    except Exception as e:  # inductor needs a C++ toolchain; report, never hide
        if "InvalidCxxCompiler" in type(e).__name__:
            pytest.skip(f"inductor unavailable: {e}")
        raise
    assert_close(y, m(x))


def test_export():
    m = Net().eval()
    ep = torch.export.export(m, (torch.randn(2, 3, 8, 8),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("fastlayers" in t for t in targets), targets
    x = torch.randn(2, 3, 8, 8)
    assert_close(ep.module()(x), m(x))
