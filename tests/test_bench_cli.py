"""`python -m fastlayers bench` runs, exits 0 and writes its JSON (a smoke test:
timings are never asserted)."""
import json
import subprocess
import sys


def test_bench_cli_smoke(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastlayers", "bench", "--quick", "--cases",
                        "Linear 64x784,MaxPool k2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    names = [r["case"] for r in res["rows"]]
    assert names == ["Linear 64x784->256", "MaxPool k2 64x6x28x28 (LeNet)"]
    for r in res["rows"]:
        assert r["torch_fwd_ms"] > 0 and r["ours_fwd_ms"] > 0 and "ours_saved_bytes" in r
    assert res["rows"][1]["ours_saved_bytes"] * 4 <= res["rows"][1]["torch_saved_bytes"]
    assert "speedup" in p.stdout or "case" in p.stdout


def test_peak_memory_probe_sees_the_step():
    """The per-step peak-memory probe charges at least the step's own output
    and input gradient (both fully written), measured in a fresh process."""
    from fastlayers.bench import peak_step_mb, suite
    names = [c.name for c in suite()]
    i = names.index("BatchNorm2d 32x64x32x32")
    mib = 32 * 64 * 32 * 32 * 4 / 2 ** 20  # 8 MiB per tensor of that shape
    for lib in ("torch", "ours"):
        assert peak_step_mb(i, lib, 1) >= 1.5 * mib
