"""Kernel-level timing of the fastlayers CUDA GEMM/conv tile configs (forced with
FASTLAYERS_SIMT_CFG, read per call) and single calls for Nsight Compute.

    python benchmarks/gpu_profile.py time     # config sweep, CUDA-event medians
    python benchmarks/gpu_profile.py once     # one call of each op (for ncu)
"""
import os
import statistics
import sys

import torch

import fastlayers  # noqa: F401

ops = torch.ops.fastlayers
DEV = "cuda"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def med(f, reps=15):
    f(); f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record()
        ts.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ts)


def cases():
    a, w = torch.randn(4096, 4096, device=DEV), torch.randn(4096, 4096, device=DEV)
    x = torch.randn(32, 64, 56, 56, device=DEV)
    wc = torch.randn(64, 64, 3, 3, device=DEV)
    gy = torch.randn(32, 64, 56, 56, device=DEV)
    xp = torch.randn(32, 64, 112, 112, device=DEV)
    out, off = ops.max_pool2d_forward(xp, [3, 3], [2, 2], [1, 1], [1, 1], False)
    gp = torch.randn_like(out)
    gy_bn = torch.randn_like(xp)
    xp_cl = xp.contiguous(memory_format=torch.channels_last)
    gy_cl = gy_bn.contiguous(memory_format=torch.channels_last)
    return {
        "gemm4096": (2 * 4096**3, lambda: ops.linear_forward(a, w, None)),
        "conv_fwd": (2 * 32 * 64 * 56 * 56 * 64 * 9,
                     lambda: ops.conv2d_forward(x, wc, None, [1, 1], [1, 1], [1, 1], 1)),
        "conv_dgrad": (2 * 32 * 64 * 56 * 56 * 64 * 9, lambda: ops.conv2d_backward(
            gy, x, wc, [1, 1], [1, 1], [1, 1], 1, [True, False, False])),
        "conv_wgrad": (2 * 32 * 64 * 56 * 56 * 64 * 9, lambda: ops.conv2d_backward(
            gy, x, wc, [1, 1], [1, 1], [1, 1], 1, [False, True, False])),
        "pool_bwd": (0, lambda: ops.max_pool2d_backward(gp, off, [32, 64, 112, 112], [3, 3],
                                                        [2, 2], [1, 1], [1, 1], False)),
        "pool_fwd": (0, lambda: ops.max_pool2d_forward(xp, [3, 3], [2, 2], [1, 1], [1, 1], False)),
        "bn_train_bwd": (0, lambda: bn_step(xp, gy_bn)),
        "bn_train_bwd_cl": (0, lambda: bn_step(xp_cl, gy_cl)),
    }


def bn_step(x, gy):
    c = x.shape[1]
    w, b = torch.ones(c, device=DEV), torch.zeros(c, device=DEV)
    rm, rv = torch.zeros(c, device=DEV), torch.ones(c, device=DEV)
    y, mean, invstd = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    ops.batch_norm_backward(gy, x, w, mean, invstd, True, [True, True, True])


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "time"
    cs = cases()
    if mode == "once":
        for name, (_, f) in cs.items():
            f()
        torch.cuda.synchronize()
        return
    for name, (flops, f) in cs.items():
        if not flops:
            continue
        row = []
        for cfg in ("", "0", "3", "1", "1+minb2"):
            os.environ.pop("FASTLAYERS_SIMT_CFG", None)
            os.environ.pop("FASTLAYERS_SIMT_MINB", None)
            if cfg:
                os.environ["FASTLAYERS_SIMT_CFG"] = cfg[0]
            if cfg.endswith("minb2"):
                os.environ["FASTLAYERS_SIMT_MINB"] = "2"
            t = med(f)
            row.append(f"cfg{cfg or '-auto'} {t:.3f} ms {flops / t / 1e9:.1f} TF")
        os.environ.pop("FASTLAYERS_SIMT_CFG", None)
        os.environ.pop("FASTLAYERS_SIMT_MINB", None)
        print(f"{name:12s} " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
