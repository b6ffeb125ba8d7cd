"""fastlayers.conv2d_forward / conv2d_backward against torch's conv2d and autograd.

The reference is torch in float64 on the same (upcast) inputs; our float32 results
must be within a tolerance relative to the largest reference magnitude.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastlayers  # noqa: F401  (registers torch.ops.fastlayers.*)
from helpers import DEFAULT_ISA

ops = torch.ops.fastlayers
CL = torch.channels_last

# (N, C, H, W, K, R, S, stride, padding, dilation, groups)
CASES = {
    "3x3p1": (2, 4, 8, 8, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "stride2_nopad": (2, 3, 9, 9, 5, 3, 3, (2, 2), (0, 0), (1, 1), 1),
    "dilation2": (2, 4, 11, 10, 3, 3, 3, (1, 1), (2, 2), (2, 2), 1),
    "groups2": (2, 6, 7, 9, 4, 3, 3, (1, 1), (1, 1), (1, 1), 2),
    "groups3_s2": (3, 6, 10, 8, 9, 3, 2, (2, 1), (1, 0), (1, 1), 3),
    "depthwise": (2, 5, 9, 8, 5, 3, 3, (1, 1), (1, 1), (1, 1), 5),
    "depthwise_s2_d2": (2, 4, 13, 12, 4, 3, 3, (2, 2), (2, 2), (2, 2), 4),
    "depthwise_mult3": (2, 3, 8, 7, 9, 3, 3, (1, 1), (1, 1), (1, 1), 3),
    # Depthwise grad_weight takes up to 12 taps per pass (3 filter rows of <= 4 taps,
    # 2 of 5-6, 1 of 7-8, in 8-tap column blocks): filter heights that leave 1 or 2
    # rows over, 5-tap rows, and 10-tap rows (two column blocks), dilated.
    "depthwise_r5s3": (2, 4, 11, 12, 4, 5, 3, (1, 1), (2, 1), (1, 1), 4),
    "depthwise_r4s5_mult2": (2, 3, 10, 13, 6, 4, 5, (1, 1), (1, 2), (1, 1), 3),
    "depthwise_r2s10_d2": (2, 2, 9, 30, 2, 2, 10, (1, 1), (1, 4), (2, 2), 2),
    "depthwise_7x7": (1, 3, 12, 13, 3, 7, 7, (1, 1), (3, 3), (1, 1), 3),
    "cin1_lenet": (3, 1, 12, 12, 6, 5, 5, (1, 1), (0, 0), (1, 1), 1),
    "cin1_strided": (2, 1, 11, 13, 4, 3, 5, (2, 3), (1, 2), (1, 1), 1),
    "pointwise": (2, 8, 5, 7, 6, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    "pointwise_groups": (2, 8, 5, 7, 6, 1, 1, (1, 1), (0, 0), (1, 1), 2),
    "1x1_stride2": (2, 8, 7, 7, 6, 1, 1, (2, 2), (0, 0), (1, 1), 1),
    "1x1_pad1": (2, 3, 4, 5, 2, 1, 1, (1, 1), (1, 1), (1, 1), 1),
    "primes": (3, 5, 13, 7, 7, 3, 5, (2, 3), (1, 2), (2, 1), 1),
    "kernel_eq_padded": (2, 3, 5, 4, 4, 7, 6, (1, 1), (1, 1), (1, 1), 1),
    "kernel_eq_input": (2, 3, 5, 5, 4, 5, 5, (1, 1), (0, 0), (1, 1), 1),
    "stride_gt_kernel": (2, 3, 10, 11, 4, 2, 2, (3, 4), (1, 0), (1, 1), 1),
    "batch1": (1, 4, 9, 9, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "batch0": (0, 4, 9, 9, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "batch0_depthwise": (0, 4, 9, 9, 4, 3, 3, (1, 1), (1, 1), (1, 1), 4),
    # Column-strided im2col (sW > 1) through the column-phase split: a
    # ResNet-stem-like k7 s2 p3 with an odd width and two tiles cutting output
    # rows, stride 3 with dilation (every phase used), stride only along W.
    "split_stem_odd": (2, 3, 67, 61, 40, 7, 7, (2, 2), (3, 3), (1, 1), 1),
    "split_s3_dilated": (2, 5, 23, 29, 36, 3, 3, (3, 3), (2, 2), (2, 2), 1),
    "split_w_only": (2, 4, 9, 20, 36, 3, 3, (1, 2), (1, 1), (1, 1), 1),
    # Implicit GEMM (NCHW, Cg < 16, Q a multiple of the sliver width, Kg > 32
    # so not the flat kernels): a stem-like k7 s2 p3, K over one KC block
    # with groups, one image split into row blocks over threads, stride 3
    # dilated, unequal strides; Kg off the 6-row micro-tile.
    "implicit_stem": (2, 3, 64, 64, 40, 7, 7, (2, 2), (3, 3), (1, 1), 1),
    "implicit_kblocks_groups": (1, 30, 20, 32, 80, 5, 5, (1, 1), (2, 2), (1, 1), 2),
    "implicit_n1_split": (1, 5, 40, 48, 36, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "implicit_s3_dil": (2, 4, 46, 46, 36, 3, 3, (3, 3), (2, 2), (2, 2), 1),
    "implicit_s21": (2, 3, 21, 32, 40, 3, 3, (2, 1), (1, 1), (1, 1), 1),
    # NCHW with Cg >= 16 and Kg > 32 (ahead of the NHWC route): forward and
    # the stride-1 grad_input run as a forward conv both implicit; groups.
    "implicit_cg48_dgrad": (2, 48, 16, 16, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "implicit_cg16_g2": (2, 32, 8, 16, 80, 3, 3, (1, 1), (1, 1), (1, 1), 2),
    # The same on the AVX-512 kernels' 32-lane slivers (Q = 64 and 32; the
    # cases above with Q = 16 or 48 take im2col there): two slivers per row
    # and Kg off the 14-row micro-tile; Cg >= 16 with its grad_input.
    "implicit_q64_edge": (1, 5, 20, 64, 36, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "implicit_cg48_dgrad_q32": (2, 48, 8, 32, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    # Several pixel tiles per image (C*R*S = 576 -> ~450-pixel tiles), tiles
    # that cut output rows, one image (tiles spread over threads) and more.
    "multi_tile_n1": (1, 64, 32, 30, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "multi_tile_n3": (3, 64, 30, 31, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    # Im2col + GEMM (Kg > 32) with output rows of whole 16-pixel slivers, so
    # the packed im2col fills slivers with vector (masked) loads, including
    # at the first and last pixels of each channel plane; and a dilated one.
    "sliver_rows": (2, 8, 16, 32, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "sliver_rows_dilated": (2, 4, 9, 48, 36, 3, 3, (1, 1), (2, 2), (2, 2), 1),
    # Stride-1 grad_input computed as a forward conv (flipped, transposed
    # weight; padding d*(k-1)-p): groups with uneven padding, and dilation
    # with zero padding (the forward problem's padding is then the largest).
    "dgrad_fwd_groups": (2, 6, 9, 8, 72, 3, 3, (1, 1), (1, 2), (1, 1), 2),
    "dgrad_fwd_dil_nopad": (2, 4, 10, 12, 36, 3, 2, (1, 1), (0, 1), (2, 1), 1),
    "dgrad_fwd_kg1": (1, 32, 40, 44, 2, 7, 7, (1, 1), (3, 3), (1, 1), 2),
    "dgrad_fwd_r1": (2, 4, 6, 40, 40, 1, 5, (1, 1), (0, 2), (1, 1), 1),
    "dgrad_fwd_pad_limit": (2, 4, 8, 20, 36, 3, 3, (1, 1), (2, 2), (1, 1), 1),
    "dgrad_pad_past_limit": (2, 4, 8, 20, 36, 3, 3, (1, 1), (3, 3), (1, 1), 1),
    "dgrad_fwd_cut_rows_n1": (1, 8, 37, 45, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    # Planes smaller than one sliver (every fill masked at both ends), and
    # P*Q == 1 through the im2col grad_weight (a rank-1 GEMM per image).
    "tiny_plane": (2, 8, 3, 4, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "tiny_plane_row": (2, 8, 1, 20, 40, 1, 3, (1, 1), (0, 1), (1, 1), 1),
    "wgrad_pq1": (2, 16, 5, 5, 40, 5, 5, (1, 1), (0, 0), (1, 1), 1),
    # The flat direct kernels (Kg <= 32, stride 1, float NCHW) on larger
    # planes: ~290 KiB per image (all three passes direct), ~830 KiB
    # (forward and grad_weight direct, grad_input the GEMM path), dilated.
    "small_plane_290k": (2, 16, 40, 44, 24, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "small_plane_830k": (1, 32, 56, 56, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "small_plane_dilated": (2, 8, 50, 60, 16, 3, 3, (1, 1), (2, 2), (2, 2), 1),
    # A weight over 2 MiB: grad_weight without per-thread partial copies (the
    # GEMMs parallelise inside), grad_input without the flipped-weight path.
    "big_weight": (3, 256, 5, 6, 288, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    # 7x7 output planes: the NCHW forward runs through the NHWC GEMM.
    "planes_7x7": (2, 48, 7, 7, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "planes_7x7_groups": (3, 48, 9, 9, 80, 3, 3, (1, 1), (0, 0), (1, 1), 2),
    # NCHW with Cg >= 16: forward (and the stride-1 grad_input run as a
    # forward conv) through the NHWC GEMM with per-image transposes; pixel
    # counts and Kg off the 6 x 16 micro-tile, groups, stride 2, 3 images.
    "via_nhwc_k40": (3, 24, 10, 9, 40, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "via_nhwc_groups_s2": (3, 32, 11, 13, 24, 3, 3, (2, 2), (1, 1), (1, 1), 2),
    "via_nhwc_dil_5x3": (2, 16, 12, 11, 36, 5, 3, (1, 1), (2, 1), (2, 1), 1),
    # A 2.5 MiB weight: NHWC column tiles over 512 KiB (a quarter of the
    # weight), several per image (72 of the 576 pixels).
    "via_nhwc_big_tiles": (2, 256, 24, 24, 272, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    # Small planes in the NHWC formulation: the rows of several images go
    # into one GEMM (here 7 images of 3x3 pixels per GEMM: 7 + 3 for 10).
    "multi_image_tail": (10, 256, 3, 3, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1),
}

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def assert_close(got, ref, dtype, what):
    assert got.dtype == dtype, what
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (got.double() - ref.double()).abs().max().item()
    bound = TOL[dtype] * (1.0 + ref.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def assert_same_layout(got, ref, what):
    """Same memory format as torch's own result (channels_last iff input or
    weight suggests channels_last; grad_weight keeps the weight's format)."""
    for fmt in (torch.contiguous_format, CL):
        assert got.is_contiguous(memory_format=fmt) == ref.is_contiguous(memory_format=fmt), \
            f"{what}: layout {got.stride()} differs from torch's {ref.stride()}"


def make(case, dtype, layout, bias, seed=0):
    N, C, H, W, K, R, S, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C // groups, R, S, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64) if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "weight_channels_last":
        w = w.contiguous(memory_format=CL)
    elif layout == "noncontiguous":
        # A slice along W of a wider tensor, and a transposed-storage weight.
        xx = torch.randn(N, C, H, W + 3, generator=g, dtype=torch.float64).to(dtype)
        xx[..., 1:W + 1] = x
        x = xx[..., 1:W + 1]
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
        assert x.numel() == 0 or not (x.is_contiguous() or x.is_contiguous(memory_format=CL))
    return x, w, b, (list(stride), list(padding), list(dilation), groups)


def reference(x, w, b, args, dy):
    stride, padding, dilation, groups = args
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if b is not None else None
    y = F.conv2d(xr, wr, br, stride, padding, dilation, groups)
    gi, gw, gb = None, None, None
    if dy is not None:
        inputs = [xr, wr] + ([br] if br is not None else [])
        grads = torch.autograd.grad(y, inputs, dy.double(), allow_unused=True)
        gi, gw = grads[0], grads[1]
        gb = grads[2] if br is not None else dy.double().sum((0, 2, 3))
    return y.detach(), gi, gw, gb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "weight_channels_last",
                                    "noncontiguous"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(name, layout, dtype):
    case = CASES[name]
    bias = hash(name) % 2 == 0 or layout == "contiguous"
    x, w, b, args = make(case, dtype, layout, bias)
    y = ops.conv2d_forward(x, w, b, *args)
    y_ref, *_ = reference(x, w, b, args, None)
    assert_close(y, y_ref, dtype, "output")
    if x.shape[0] > 0:  # (torch's layout for empty batches is arbitrary)
        assert_same_layout(y, y_ref, "output")

    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dy = dy.to(dtype)
    if layout == "noncontiguous":
        dy = dy.transpose(0, 1).contiguous().transpose(0, 1)
    gi, gw, gb = ops.conv2d_backward(dy, x, w, *args, [True, True, True])
    _, gi_ref, gw_ref, gb_ref = reference(x, w, b, args, dy)
    assert_close(gi, gi_ref, dtype, "grad_input")
    assert_close(gw, gw_ref, dtype, "grad_weight")
    assert_close(gb, gb_ref, dtype, "grad_bias")
    if x.shape[0] > 0:
        assert_same_layout(gi, gi_ref, "grad_input")
    # grad_weight has the weight's own strides.
    assert gw.stride() == torch.empty_like(w).stride(), (gw.stride(), w.stride())
    if layout in ("channels_last", "weight_channels_last") and y.shape[0] > 1 and \
            min(y.shape[2:]) > 1 and w.shape[1] > 1 and min(w.shape[2:]) > 1:
        # Unambiguous cases: torch's rule gives channels_last.
        assert y.is_contiguous(memory_format=CL) and gi.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("name", ["3x3p1", "depthwise", "pointwise"])
def test_output_mask(name, mask):
    x, w, b, args = make(CASES[name], torch.float64, "contiguous", True)
    y = ops.conv2d_forward(x, w, b, *args)
    dy = torch.randn_like(y)
    got = ops.conv2d_backward(dy, x, w, *args, list(mask))
    _, *ref = reference(x, w, b, args, dy)
    for want, g, r, what in zip(mask, got, ref, ("grad_input", "grad_weight", "grad_bias")):
        if want:
            assert_close(g, r, torch.float64, what)
        else:
            assert g.shape == (0,), f"{what} was not asked for but has shape {tuple(g.shape)}"


def test_batch0_grads_are_zero():
    x, w, b, args = make(CASES["batch0"], torch.float32, "contiguous", True)
    y = ops.conv2d_forward(x, w, b, *args)
    assert y.shape == (0, 5, 9, 9)
    gi, gw, gb = ops.conv2d_backward(torch.empty_like(y), x, w, *args, [True, True, True])
    assert gi.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(5))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", ["multi_tile_n1", "3x3p1", "depthwise", "cin1_lenet",
                                  "dgrad_fwd_cut_rows_n1", "big_weight", "via_nhwc_k40",
                                  "via_nhwc_dil_5x3"])
def test_thread_counts(name, threads):
    """Serial, per-thread-chunk and uneven splits give the right answer and are
    bitwise repeatable for a fixed thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layout in ("contiguous", "channels_last"):
            x, w, b, args = make(CASES[name], torch.float32, layout, True)
            y = ops.conv2d_forward(x, w, b, *args)
            dy = torch.randn_like(y)
            g1 = ops.conv2d_backward(dy, x, w, *args, [True, True, True])
            g2 = ops.conv2d_backward(dy, x, w, *args, [True, True, True])
            y_ref, *ref = reference(x, w, b, args, dy)
            assert_close(y, y_ref, torch.float32, f"output {layout}")
            for a, a2, r, what in zip(g1, g2, ref, ("gi", "gw", "gb")):
                assert_close(a, r, torch.float32, f"{what} {layout}")
                assert torch.equal(a, a2), f"{what} {layout} not deterministic"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("isa", fastlayers._C.supported_isas())
def test_every_isa(isa):
    fastlayers._C.set_isa(isa)
    try:
        for name in ("3x3p1", "pointwise", "groups2", "depthwise", "sliver_rows",
                     "sliver_rows_dilated", "multi_tile_n3", "dgrad_fwd_groups",
                     "dgrad_fwd_dil_nopad", "dgrad_fwd_kg1", "dgrad_fwd_cut_rows_n1",
                     "tiny_plane", "wgrad_pq1", "planes_7x7_groups", "via_nhwc_k40",
                     "via_nhwc_groups_s2", "via_nhwc_dil_5x3", "split_stem_odd",
                     "split_s3_dilated", "implicit_stem", "implicit_kblocks_groups",
                     "implicit_n1_split", "implicit_cg48_dgrad", "implicit_q64_edge",
                     "implicit_cg48_dgrad_q32"):
            for layout in ("contiguous", "channels_last"):
                x, w, b, args = make(CASES[name], torch.float32, layout, True)
                y = ops.conv2d_forward(x, w, b, *args)
                dy = torch.randn_like(y)
                y_ref, *ref = reference(x, w, b, args, dy)
                assert_close(y, y_ref, torch.float32, "output")
                got = ops.conv2d_backward(dy, x, w, *args, [True, True, True])
                for a, r, what in zip(got, ref, ("gi", "gw", "gb")):
                    assert_close(a, r, torch.float32, what)
    finally:
        fastlayers._C.set_isa(DEFAULT_ISA)


def test_larger_float32_against_torch_float32():
    """A realistic layer, float32 vs torch's own float32 result."""
    x = torch.randn(4, 32, 20, 20)
    w = torch.randn(48, 32, 3, 3) * 0.1
    b = torch.randn(48)
    y = ops.conv2d_forward(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(y, F.conv2d(x, w, b, 1, 1), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ errors

def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# (input, weight, bias, stride, padding, dilation, groups)
BAD = {
    "channel_mismatch": (_x(2, 4, 8, 8), _x(6, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], 1),
    "channel_mismatch_groups": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], 2),
    "C_not_divisible": (_x(2, 5, 8, 8), _x(6, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 2),
    "K_not_divisible": (_x(2, 4, 8, 8), _x(5, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 2),
    "K_zero": (_x(2, 4, 8, 8), _x(0, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], 1),
    "kernel_too_big": (_x(2, 4, 8, 8), _x(6, 4, 9, 9), None, [1, 1], [0, 0], [1, 1], 1),
    "kernel_too_big_dilated": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), None, [1, 1], [0, 0], [4, 4], 1),
    "kernel_too_big_one_dim": (_x(2, 4, 8, 3), _x(6, 4, 3, 5), None, [1, 1], [0, 0], [1, 1], 1),
    "stride_zero": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), None, [0, 1], [0, 0], [1, 1], 1),
    "stride_negative": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), None, [1, -1], [0, 0], [1, 1], 1),
    "dilation_zero": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), None, [1, 1], [0, 0], [0, 1], 1),
    "padding_negative": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), None, [1, 1], [-1, 0], [1, 1], 1),
    "groups_zero": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], 0),
    "input_2d": (_x(4, 8), _x(6, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], 1),
    "input_5d": (_x(1, 2, 4, 8, 8), _x(6, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], 1),
    "weight_3d": (_x(2, 4, 8, 8), _x(6, 4, 3), None, [1, 1], [0, 0], [1, 1], 1),
    "dtype_mismatch": (_x(2, 4, 8, 8), _x(6, 4, 3, 3, dtype=torch.float64), None, [1, 1], [0, 0],
                       [1, 1], 1),
    "bias_shape": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), _x(5), [1, 1], [0, 0], [1, 1], 1),
    "bias_2d": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), _x(6, 1), [1, 1], [0, 0], [1, 1], 1),
    "bias_dtype": (_x(2, 4, 8, 8), _x(6, 4, 3, 3), _x(6, dtype=torch.float64), [1, 1], [0, 0],
                   [1, 1], 1),
    "empty_spatial": (_x(2, 4, 0, 8), _x(6, 4, 1, 1), None, [1, 1], [1, 1], [1, 1], 1),
}


@pytest.mark.parametrize("name", list(BAD))
def test_errors_match_torch(name):
    x, w, b, stride, padding, dilation, groups = BAD[name]
    with pytest.raises(Exception) as torch_err:
        F.conv2d(x, w, b, stride, padding, dilation, groups)
    with pytest.raises(Exception) as ours:
        ops.conv2d_forward(x, w, b, stride, padding, dilation, groups)
    assert type(ours.value) is type(torch_err.value), (ours.value, torch_err.value)
    if x.dim() == 4 and w.dim() == 4 and b is None:
        dy = torch.zeros(x.shape[0], max(w.shape[0], 1), 3, 3, dtype=x.dtype)
        with pytest.raises(type(torch_err.value)):
            ops.conv2d_backward(dy, x, w, stride, padding, dilation, groups, [True, True, True])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_unsupported_dtype(dtype):  # (float16 / bfloat16: test_reduced_precision.py)
    x, w = torch.ones(1, 2, 4, 4, dtype=dtype), torch.ones(3, 2, 3, 3, dtype=dtype)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        ops.conv2d_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1)


def test_grad_output_shape_checked():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.conv2d_backward(torch.randn(2, 6, 7, 6), x, w, [1, 1], [0, 0], [1, 1], 1,
                            [True, True, True])
    with pytest.raises(RuntimeError, match="dtype"):
        ops.conv2d_backward(torch.randn(2, 6, 6, 6, dtype=torch.float64), x, w, [1, 1], [0, 0],
                            [1, 1], 1, [True, True, True])


# Shapes for the specialised CPU kernels: AVX2 direct Cg == 1 kernels (wide rows
# with several 64-column blocks and tails, padding wider than the kernel,
# dilation, stride in H only, channel multipliers) and the flat small-conv
# kernels for Cg > 1, stride 1 (LeNet conv2, groups, dilation, 32 output
# channels, padding beyond the kernel). Each runs on every ISA path.
SMALL_PATH_CASES = {
    "dw_wide": (2, 3, 5, 150, 3, 3, 3, (1, 1), (1, 1), (1, 1), 3),
    "dw_pad_gt_kernel": (2, 2, 6, 9, 2, 1, 3, (1, 1), (2, 3), (1, 1), 2),
    "dw_dil_strideH": (2, 3, 12, 21, 6, 3, 3, (2, 1), (2, 2), (2, 2), 3),
    "cin1_k5_wide": (2, 1, 9, 70, 6, 5, 5, (1, 1), (0, 2), (1, 1), 1),
    "cin1_lenet1_short_rows": (2, 1, 12, 14, 6, 5, 5, (1, 1), (0, 0), (1, 1), 1),
    "cin1_mult9_q17": (2, 1, 9, 19, 9, 3, 3, (2, 1), (1, 0), (1, 1), 1),
    "dw_mult4_q8_dil": (2, 2, 11, 10, 8, 3, 2, (1, 1), (1, 1), (2, 1), 2),
    "dw_5x5_tail": (3, 4, 11, 13, 4, 5, 5, (1, 1), (2, 2), (1, 1), 4),
    "small_lenet2": (3, 6, 14, 14, 16, 5, 5, (1, 1), (0, 0), (1, 1), 1),
    "small_groups_dil": (2, 6, 9, 11, 4, 3, 3, (1, 1), (2, 1), (2, 1), 2),
    "small_k32_pad": (2, 3, 5, 6, 32, 1, 3, (1, 1), (2, 3), (1, 1), 1),
    "small_wide": (1, 2, 4, 40, 5, 2, 3, (1, 1), (1, 0), (1, 2), 1),
    "small_k8_dil_pad": (2, 3, 7, 15, 8, 3, 2, (1, 1), (1, 2), (2, 1), 1),
    "small_k16_groups": (2, 4, 9, 23, 32, 3, 3, (1, 1), (1, 1), (1, 2), 2),
    # Cg = 16-32 (before, the NHWC route took these forwards): groups of 16
    # channels, dilated 32 channels with 32 outputs.
    "small_cg16_g4": (2, 64, 12, 14, 64, 3, 3, (1, 1), (1, 1), (1, 1), 4),
    "small_cg32_dil": (2, 32, 10, 9, 32, 3, 3, (1, 1), (2, 2), (2, 2), 1),
}


@pytest.mark.parametrize("name", sorted(SMALL_PATH_CASES))
def test_small_and_direct_paths(name, isa):
    for layout, bias in (("contiguous", True), ("contiguous", False), ("channels_last", True)):
        x, w, b, args = make(SMALL_PATH_CASES[name], torch.float32, layout, bias)
        y = ops.conv2d_forward(x, w, b, *args)
        dy = torch.randn_like(y)
        y_ref, *ref = reference(x, w, b, args, dy)
        assert_close(y, y_ref, torch.float32, f"output {layout}")
        got = ops.conv2d_backward(dy, x, w, *args, [True, True, b is not None])
        for a, r, what in zip(got, ref, ("gi", "gw", "gb")):
            if what == "gb" and b is None:
                continue
            assert_close(a, r, torch.float32, f"{what} {layout}")
        for m in ([True, False, False], [False, True, False], [False, False, True]):
            part = ops.conv2d_backward(dy, x, w, *args, m)
            for on, a, r, what in zip(m, part, ref, ("gi", "gw", "gb")):
                if on and r is not None:
                    assert_close(a, r, torch.float32, f"{what} alone {layout}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", ["small_lenet2", "dw_5x5_tail"])
def test_small_paths_independent_of_thread_count(name, threads):
    """grad_weight / grad_bias sum fixed image blocks: bitwise the same for any thread count."""
    x, w, b, args = make(SMALL_PATH_CASES[name], torch.float32, "contiguous", True)
    dy = torch.randn_like(ops.conv2d_forward(x, w, b, *args))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        base = ops.conv2d_backward(dy, x, w, *args, [True, True, True])
        torch.set_num_threads(threads)
        got = ops.conv2d_backward(dy, x, w, *args, [True, True, True])
    finally:
        torch.set_num_threads(old)
    for a, r in zip(got, base):
        assert torch.equal(a, r)
