"""`python -m fastlayers bench` runs, exits 0 and writes its JSON (a smoke test:
timings are never asserted)."""
import json
import subprocess
import sys


def test_bench_cli_smoke(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastlayers", "bench", "--quick", "--cases",
                        "Linear 64x784,MaxPool k2", "--out", str(tmp_path), "--malloc", "keep"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    names = [r["case"] for r in res["rows"]]
    assert names == ["Linear 64x784->256", "MaxPool k2 64x6x28x28 (LeNet)"]
    assert res["malloc"] == "keep"
    for r in res["rows"]:
        assert r["torch_fwd_ms"] > 0 and r["ours_fwd_ms"] > 0 and "ours_saved_bytes" in r
    assert res["rows"][1]["ours_saved_bytes"] * 4 <= res["rows"][1]["torch_saved_bytes"]
    assert "speedup" in p.stdout or "case" in p.stdout


def test_malloc_keep_serves_torch_from_the_heap():
    """--malloc keep: glibc serves a 32 MiB torch tensor from its heap (no
    mmap'd chunk) and keeps it resident after it is freed; by default the
    block is mmap'd and handed back."""
    code = (
        "import ctypes, sys, torch\n"
        "from fastlayers.bench import keep_freed_memory\n"
        "class MI(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in 'arena ordblks smblks hblks hblkhd "
        "usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
        "libc = ctypes.CDLL(None); libc.mallinfo2.restype = MI\n"
        "if sys.argv[1] == 'keep': keep_freed_memory()\n"
        "from fastlayers.bench import _status_kb\n"
        "r0, h0 = _status_kb('VmRSS'), libc.mallinfo2().hblkhd\n"
        "t = torch.ones(8 * 2 ** 20)  # 32 MiB, touched\n"
        "mapped = libc.mallinfo2().hblkhd - h0\n"
        "del t\n"
        "kept = _status_kb('VmRSS') - r0\n"
        "print(int(mapped >= 2 ** 25), int(kept >= 30 * 1024))\n"
    )
    out = {}
    for mode in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[mode] = r.stdout.split()
    assert out == {"default": ["1", "0"], "keep": ["0", "1"]}


def test_peak_memory_probe_sees_the_step():
    """The per-step peak-memory probe charges at least the step's own output
    and input gradient (both fully written), measured in a fresh process."""
    from fastlayers.bench import peak_step_mb, suite
    names = [c.name for c in suite()]
    i = names.index("BatchNorm2d 32x64x32x32")
    mib = 32 * 64 * 32 * 32 * 4 / 2 ** 20  # 8 MiB per tensor of that shape
    for lib in ("torch", "ours"):
        assert peak_step_mb(i, lib, 1) >= 1.5 * mib


def test_odd_suite_cases_build_and_match_torch():
    """Every case of `--suite odd` builds with both libraries, and the two
    modules give the same output on the case's input (so its timings compare
    like with like); the pool byte counts follow torch's output sizes."""
    import torch

    import fastlayers
    from fastlayers.bench import _pool_out, odd_suite
    for case in odd_suite():
        torch.manual_seed(0)
        ref = case.build(torch.nn)
        ours = case.build(fastlayers)
        ours.load_state_dict(ref.state_dict())
        x = case.input()
        assert x.is_contiguous(memory_format=torch.channels_last) == case.channels_last
        y = ours(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
        if case.channels_last:  # timed in the layout the case names
            assert y.is_contiguous(memory_format=torch.channels_last), case.name
        assert case.flops > 0 or case.bytes_fwd > 0, case.name
    m = torch.nn.MaxPool2d(3, 2, ceil_mode=True)
    assert m(torch.zeros(1, 1, 31, 29)).shape[-2:] == (_pool_out(31, 3, 2, 0, ceil=True),
                                                      _pool_out(29, 3, 2, 0, ceil=True))


def test_bench_cli_odd_suite(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastlayers", "bench", "--quick", "--no-memory",
                        "--suite", "odd", "--cases", "3-D,ceil", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    names = [r["case"] for r in json.loads((tmp_path / "bench.json").read_text())["rows"]]
    assert names == ["Linear 3-D 8x50x300->200", "MaxPool odd 7x5x31x29 k3s2 ceil"]


def test_models_suite_cases_build_and_match_torch():
    """Every network of `--suite models` builds with both layer sets, the two
    share weights and give the same output (eval mode, so BatchNorm uses the
    same running statistics and dropout is off), and its FLOP count is the
    one torch's counter gives for the whole batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import fastlayers
    from fastlayers.bench import models_suite
    cases = models_suite()
    assert len(cases) >= 3
    for case in cases:
        torch.manual_seed(0)
        ref = case.make(torch.nn).eval()
        ours = case.make(fastlayers).eval()
        ours_layers = (fastlayers.Linear, fastlayers.Conv2d, fastlayers.MaxPool2d,
                       fastlayers.BatchNorm2d)
        assert any(isinstance(m, fastlayers.Conv2d) for m in ours.modules()), case.name
        assert not any(isinstance(m, ours_layers) for m in ref.modules()), case.name
        ours.load_state_dict(ref.state_dict())
        x = torch.randn((2,) + tuple(case.shape[1:]))
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            want = ref(x)
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)
        assert case.flops == fc.get_total_flops() / 2 * case.shape[0], case.name


def test_bench_cli_models_suite(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastlayers", "bench", "--quick", "--no-memory",
                        "--suite", "models", "--cases", "LeNet", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["case"] for r in rows] == ["LeNet-5 64x1x28x28 (the train CLI's)"]
    r = rows[0]
    assert r["kind"] == "model" and r["ours_fwdbwd_ms"] > 0 and r["torch_fwdbwd_ms"] > 0
    assert r["ours_fwd_gflops"] > 0 and r["ours_saved_bytes"] > 0
