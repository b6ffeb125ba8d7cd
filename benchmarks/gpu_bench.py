"""fastlayers CUDA kernels vs torch on the current GPU.

Times are medians of CUDA-event measurements, the two implementations
interleaved rep by rep after a warm-up. fp32 runs with TF32 off on both
sides. For the memory-bound ops (BatchNorm, MaxPool) L2 is flushed before
every rep by writing a 256 MB buffer, and the rate is reported against a
measured device-to-device copy bandwidth.

Writes $OUT/gpu_bench.json (or ./gpu_bench.json; GPU_BENCH_NAME renames it) and
prints a table. FASTLAYERS_CUDA_NEW=0 turns off the newest kernels (csrc/cuda/common.cuh).
"""
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastlayers  # noqa: F401

ops = torch.ops.fastlayers
DEV = "cuda"
T0 = time.time()
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "100"))
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.backends.cudnn.benchmark = True

_scratch = None


def flush_l2():
    global _scratch
    if _scratch is None:
        _scratch = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    _scratch.fill_(1)


def bench(fns, reps=20, warmup=3, flush=False):
    """fns: {name: callable}. Returns {name: median ms}, interleaved timing."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    torch.cuda.synchronize()
    events = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if flush:
                flush_l2()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            f()
            e.record()
            events[k].append((s, e))
    torch.cuda.synchronize()
    return {k: statistics.median(s.elapsed_time(e) for s, e in v) for k, v in events.items()}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


rows = []


def record(case, t, extra=None, unit=None, work=None):
    row = {"case": case, "torch_ms": round(t["torch"], 4), "fastlayers_ms": round(t["ours"], 4),
           "speed_vs_torch": round(t["torch"] / t["ours"], 3)}
    if unit == "TFLOP/s":
        row["torch_tflops"] = round(work / t["torch"] / 1e9, 2)
        row["fastlayers_tflops"] = round(work / t["ours"] / 1e9, 2)
    elif unit == "GB/s":
        row["torch_gbps"] = round(work / t["torch"] / 1e6, 1)
        row["fastlayers_gbps"] = round(work / t["ours"] / 1e6, 1)
        if COPY_GBPS:
            row["torch_pct_copy_bw"] = round(100 * row["torch_gbps"] / COPY_GBPS, 1)
            row["fastlayers_pct_copy_bw"] = round(100 * row["fastlayers_gbps"] / COPY_GBPS, 1)
    row.update(extra or {})
    rows.append(row)
    print(json.dumps(row), flush=True)


def over_budget():
    if time.time() - T0 > BUDGET_S:
        print(f"time budget of {BUDGET_S:.0f} s used up: skipping the remaining cases", flush=True)
        return True
    return False


def copy_bandwidth():
    n = 512 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=DEV).fill_(3)
    dst = torch.empty_like(src)
    t = bench({"copy": lambda: dst.copy_(src)}, reps=10, warmup=2)["copy"]
    return 2 * n / t / 1e6   # read + write, GB/s


def case_gemm(dtype, n=4096):
    a = torch.randn(n, n, device=DEV).to(dtype)
    w = torch.randn(n, n, device=DEV).to(dtype)
    err = rel_err(ops.linear_forward(a, w, None), torch.mm(a.float(), w.float().t()))
    t = bench({"torch": lambda: torch.mm(a, w.t()), "ours": lambda: ops.linear_forward(a, w, None)},
              reps=10, warmup=2)
    record(f"gemm {str(dtype)[6:]} {n}^3 (A.B^T)", t, {"max_rel_err": err}, "TFLOP/s", 2 * n**3)
    if dtype in (torch.float16, torch.bfloat16) and not over_budget():
        os.environ["FASTLAYERS_NO_WGMMA"] = "1"   # read per call: the mma.sync kernel
        t = bench({"torch": lambda: torch.mm(a, w.t()), "ours": lambda: ops.linear_forward(a, w, None)},
                  reps=10, warmup=2)
        del os.environ["FASTLAYERS_NO_WGMMA"]
        record(f"gemm {str(dtype)[6:]} {n}^3 (A.B^T, mma.sync: no wgmma)", t, None, "TFLOP/s", 2 * n**3)


def case_linear():
    x, w, b = (torch.randn(512, 1024, device=DEV), torch.randn(1024, 1024, device=DEV),
               torch.randn(1024, device=DEV))
    gy = torch.randn(512, 1024, device=DEV)

    def tf():
        F.linear(x, w, b)
        gy.mm(w), gy.t().mm(x), gy.sum(0)

    def of():
        ops.linear_forward(x, w, b)
        ops.linear_backward(gy, x, w, [True, True, True])

    t = bench({"torch": tf, "ours": of}, reps=30, warmup=5)
    record("linear 512x1024->1024 fp32 fwd+bwd", t, None, "TFLOP/s", 3 * 2 * 512 * 1024 * 1024)


def case_linear_bf16(n=4096):
    x, w = torch.randn(n, n, device=DEV).bfloat16(), torch.randn(n, n, device=DEV).bfloat16()
    gy = torch.randn(n, n, device=DEV).bfloat16()
    gx, gw, _ = ops.linear_backward(gy, x, w, [True, True, False])
    err = max(rel_err(gx, gy.float() @ w.float()), rel_err(gw, gy.float().t() @ x.float()))

    def tf():
        F.linear(x, w)
        gy.mm(w), gy.t().mm(x)

    def of():
        ops.linear_forward(x, w, None)
        ops.linear_backward(gy, x, w, [True, True, False])

    t = bench({"torch": tf, "ours": of}, reps=10, warmup=2)
    record(f"linear {n}x{n}->{n} bf16 fwd+bwd", t, {"max_rel_err_bwd": err}, "TFLOP/s",
           3 * 2 * n**3)


def case_conv():
    x = torch.randn(32, 64, 56, 56, device=DEV)
    w = torch.randn(64, 64, 3, 3, device=DEV) * 0.05
    b = torch.randn(64, device=DEV)
    gy = torch.randn(32, 64, 56, 56, device=DEV)
    err = rel_err(ops.conv2d_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1), F.conv2d(x, w, b, 1, 1))
    flops = 2 * 32 * 64 * 56 * 56 * 64 * 9
    t = bench({"torch": lambda: F.conv2d(x, w, b, 1, 1),
               "ours": lambda: ops.conv2d_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1)}, reps=10)
    record("conv 32x64x56x56 k3p1 ->64 fp32 fwd", t, {"max_rel_err": err}, "TFLOP/s", flops)
    if over_budget():
        return

    def tf():
        F.conv2d(x, w, b, 1, 1)
        torch.ops.aten.convolution_backward(gy, x, w, [64], [1, 1], [1, 1], [1, 1], False, [0, 0],
                                            1, [True, True, True])

    def of():
        ops.conv2d_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1)
        ops.conv2d_backward(gy, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True])

    t = bench({"torch": tf, "ours": of}, reps=8)
    record("conv 32x64x56x56 k3p1 ->64 fp32 fwd+bwd", t, None, "TFLOP/s", 3 * flops)
    for name, mask in (("dgrad", [True, False, False]), ("wgrad", [False, True, False])):
        if over_budget():
            return
        t = bench({"torch": lambda: torch.ops.aten.convolution_backward(
                       gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask),
                   "ours": lambda: ops.conv2d_backward(gy, x, w, [1, 1], [1, 1], [1, 1], 1, mask)},
                  reps=8)
        record(f"conv 32x64x56x56 k3p1 ->64 fp32 {name}", t, None, "TFLOP/s", flops)
    xc, gyc = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    wc = w.to(memory_format=torch.channels_last)
    err = rel_err(ops.conv2d_forward(xc, wc, b, [1, 1], [1, 1], [1, 1], 1), F.conv2d(xc, wc, b, 1, 1))
    t = bench({"torch": lambda: F.conv2d(xc, wc, b, 1, 1),
               "ours": lambda: ops.conv2d_forward(xc, wc, b, [1, 1], [1, 1], [1, 1], 1)}, reps=10)
    record("conv 32x64x56x56 k3p1 ->64 fp32 fwd channels_last", t, {"max_rel_err": err},
           "TFLOP/s", flops)


def case_bn():
    x = torch.randn(32, 64, 112, 112, device=DEV)
    gy = torch.randn_like(x)
    w, b = torch.rand(64, device=DEV) + 0.5, torch.randn(64, device=DEV)
    rm, rv = torch.zeros(64, device=DEV), torch.ones(64, device=DEV)
    y, m, s = ops.batch_norm_train(x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)
    err = rel_err(y, F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5))

    def tf():
        y, sm, si = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
        torch.ops.aten.native_batch_norm_backward(gy, x, w, rm, rv, sm, si, True, 1e-5,
                                                  [True, True, True])

    def of():
        y, sm, si = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
        ops.batch_norm_backward(gy, x, w, sm, si, True, [True, True, True])

    t = bench({"torch": tf, "ours": of}, reps=15, flush=True)
    nbytes = x.numel() * 4 * 5   # fwd: read x, write y; bwd: read x, gy, write gx
    record("batchnorm 32x64x112x112 fp32 train fwd+bwd", t,
           {"max_rel_err": err, "bytes_model": "5 tensor passes"}, "GB/s", nbytes)
    if over_budget():
        return
    os.environ["FASTLAYERS_BN_NO_CLUSTER"] = "1"   # read per call: the split-kernel path
    t = bench({"torch": tf, "ours": of}, reps=15, flush=True)
    del os.environ["FASTLAYERS_BN_NO_CLUSTER"]
    record("batchnorm 32x64x112x112 fp32 train fwd+bwd (split kernels, no cluster)", t,
           {"bytes_model": "5 tensor passes"}, "GB/s", nbytes)
    t = bench({"torch": lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5),
               "ours": lambda: ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)},
              reps=15, flush=True)
    record("batchnorm 32x64x112x112 fp32 train fwd", t, {"bytes_model": "read x, write y"},
           "GB/s", x.numel() * 4 * 2)
    _, sm_t, si_t = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
    t = bench({"torch": lambda: torch.ops.aten.native_batch_norm_backward(
                   gy, x, w, rm, rv, sm_t, si_t, True, 1e-5, [True, True, True]),
               "ours": lambda: ops.batch_norm_backward(gy, x, w, m, s, True, [True, True, True])},
              reps=15, flush=True)
    record("batchnorm 32x64x112x112 fp32 bwd", t, {"bytes_model": "read x, gy, write gx"},
           "GB/s", x.numel() * 4 * 3)
    xc = x.to(memory_format=torch.channels_last)
    t = bench({"torch": lambda: torch.ops.aten.native_batch_norm(xc, w, b, rm, rv, True, 0.1, 1e-5),
               "ours": lambda: ops.batch_norm_train(xc, w, b, rm, rv, 0.1, 1e-5)},
              reps=15, flush=True)
    record("batchnorm 32x64x112x112 fp32 train fwd channels_last", t,
           {"bytes_model": "read x, write y"}, "GB/s", x.numel() * 4 * 2)


def case_pool():
    x = torch.randn(32, 64, 112, 112, device=DEV)
    out, off = ops.max_pool2d_forward(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    ref, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    ok = torch.equal(out, ref) and torch.equal(
        ops.max_pool2d_indices(off, 112, [3, 3], [2, 2], [1, 1], [1, 1]), idx)
    gy = torch.randn_like(out)

    def tf():
        o, i = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        torch.ops.aten.max_pool2d_with_indices_backward(gy, x, [3, 3], [2, 2], [1, 1], [1, 1],
                                                        False, i)

    def of():
        o, f = ops.max_pool2d_forward(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
        ops.max_pool2d_backward(gy, f, [32, 64, 112, 112], [3, 3], [2, 2], [1, 1], [1, 1], False)

    t = bench({"torch": tf, "ours": of}, reps=15, flush=True)
    nbytes = 2 * (x.numel() + out.numel()) * 4   # fwd: read x, write out; bwd: read gy, write gx
    record("maxpool k3s2p1 32x64x112x112 fp32 fwd+bwd", t,
           {"matches_torch": ok, "offsets_bytes": off.numel() * off.element_size(),
            "torch_indices_bytes": idx.numel() * idx.element_size(),
            "bytes_model": "x + out + gy + gx (data only)"}, "GB/s", nbytes)
    if over_budget():
        return
    t = bench({"torch": lambda: F.max_pool2d(x, 3, 2, 1, return_indices=True),
               "ours": lambda: ops.max_pool2d_forward(x, [3, 3], [2, 2], [1, 1], [1, 1], False)},
              reps=15, flush=True)
    record("maxpool k3s2p1 32x64x112x112 fp32 fwd", t, {"bytes_model": "x + out (data only)"},
           "GB/s", (x.numel() + out.numel()) * 4)
    t = bench({"torch": lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                   gy, x, [3, 3], [2, 2], [1, 1], [1, 1], False, idx),
               "ours": lambda: ops.max_pool2d_backward(gy, off, [32, 64, 112, 112], [3, 3], [2, 2],
                                                       [1, 1], [1, 1], False)},
              reps=15, flush=True)
    record("maxpool k3s2p1 32x64x112x112 fp32 bwd", t, {"bytes_model": "gy + gx (data only)"},
           "GB/s", (x.numel() + out.numel()) * 4)
    xc = x.to(memory_format=torch.channels_last)
    okc = torch.equal(ops.max_pool2d_forward(xc, [3, 3], [2, 2], [1, 1], [1, 1], False)[0],
                      F.max_pool2d(xc, 3, 2, 1))
    t = bench({"torch": lambda: F.max_pool2d(xc, 3, 2, 1, return_indices=True),
               "ours": lambda: ops.max_pool2d_forward(xc, [3, 3], [2, 2], [1, 1], [1, 1], False)},
              reps=15, flush=True)
    record("maxpool k3s2p1 32x64x112x112 fp32 fwd channels_last", t,
           {"matches_torch": okc, "bytes_model": "x + out (data only)"}, "GB/s",
           (x.numel() + out.numel()) * 4)


def main():
    global COPY_GBPS
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    COPY_GBPS = copy_bandwidth()
    print(f"device-to-device copy: {COPY_GBPS:.0f} GB/s", flush=True)
    cases = [lambda: case_gemm(torch.float32), lambda: case_gemm(torch.bfloat16), case_linear,
             case_linear_bf16, case_conv, case_bn, case_pool]
    for c in cases:
        if over_budget():
            break
        try:
            c()
        except Exception as e:  # keep going: report what failed
            print(f"case failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rows.append({"case": getattr(c, "__name__", "case"), "error": f"{type(e).__name__}: {e}"})
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_gbps": round(COPY_GBPS, 1), "rows": rows, "seconds": round(time.time() - T0, 1)}
    path = os.path.join(os.environ.get("OUT") or ".", os.environ.get("GPU_BENCH_NAME", "gpu_bench.json"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(f"{'case':48s} {'torch ms':>10s} {'ours ms':>10s} {'speed':>7s}  rate (torch / ours)")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:48s} ERROR {r['error']}")
            continue
        rate = ""
        if "torch_tflops" in r:
            rate = f"{r['torch_tflops']} / {r['fastlayers_tflops']} TFLOP/s"
        elif "torch_gbps" in r:
            rate = (f"{r['torch_gbps']} / {r['fastlayers_gbps']} GB/s "
                    f"({r.get('torch_pct_copy_bw', '?')}% / {r.get('fastlayers_pct_copy_bw', '?')}% of copy)")
        print(f"{r['case']:48s} {r['torch_ms']:10.3f} {r['fastlayers_ms']:10.3f} "
              f"{r['speed_vs_torch']:7.3f}  {rate}")
    print(f"wrote {path} ({result['seconds']} s)")


COPY_GBPS = None
if __name__ == "__main__":
    main()
