"""Bounded, seeded differential fuzzing against torch.nn, each layer in its own
subprocess so that a crash is a reported failure. The long profile:
    FASTLAYERS_FUZZ_EXAMPLES=3000 python -m pytest tests/test_fuzz.py
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
N = int(os.environ.get("FASTLAYERS_FUZZ_EXAMPLES", "150"))


@pytest.mark.parametrize("layer", ["linear", "conv2d", "max_pool2d", "batch_norm"])
def test_fuzz_against_torch(layer):
    env = dict(os.environ, HYPOTHESIS_NO_PLUGINS="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_worker.py"), layer, str(N), "1234"],
                       capture_output=True, text=True, timeout=1200, env=env)
    assert p.returncode == 0, f"fuzz worker crashed (rc={p.returncode}):\n{p.stderr[-3000:]}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["examples"] >= N // 2, res
    assert res["n_mismatches"] == 0, json.dumps(res["mismatches"], indent=1)[:4000]
