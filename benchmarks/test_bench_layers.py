"""pytest-benchmark pairs: torch.nn and fastlayers on the same inputs, grouped
so each pair sits together.  Run:  python -m pytest benchmarks -q
(`python -m fastlayers bench` gives the interleaved-median table with roofline.)"""
import pytest
import torch

import fastlayers
from fastlayers.bench import suite

CASES = [c for c in suite() if c.kind != "gemm"]


@pytest.mark.parametrize("impl", ["torch", "fastlayers"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer(benchmark, case, mode, impl):
    torch.manual_seed(0)
    ref = case.make(torch.nn)
    m = ref if impl == "torch" else case.make(fastlayers)
    if m is not ref:
        m.load_state_dict(ref.state_dict())
    x = torch.randn(case.shape, requires_grad=(mode == "fwd+bwd"))
    benchmark.group = f"{case.name} {mode}"
    if mode == "fwd":
        def run():
            with torch.no_grad():
                m(x)
    else:
        def run():
            y = m(x)
            y.backward(torch.ones_like(y))
            x.grad = None
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
