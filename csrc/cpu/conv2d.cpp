// Conv2d on the CPU: argument checks, layout choice and the im2col + GEMM
// paths (the Cg == 1 direct kernels live in conv2d_direct.cpp, the flat
// direct kernels for small stride-1 NCHW float convs in conv2d_small.cpp).
//
// Layout: the output (and grad_input) is channels_last iff the input or the
// weight suggests channels_last, else contiguous NCHW; the kernels run on
// dense copies of the operands in that layout.
//
// For each image n and group g, over tiles of output pixels [p0, p1):
//  NCHW  forward      Y[Kg, tile]  = W[Kg, CgRS] . col[CgRS, tile]   (+ bias_m)
//        grad_input   col          = W^T . dY[Kg, tile];  dX += col2im(col)
//        grad_weight  dW[Kg, CgRS] += dY[Kg, tile] . col^T
//  NHWC  forward      Y[tile, Kg]  = col[tile, RSCg] . W^T            (+ bias_n)
//        grad_input   col          = dY[tile, Kg] . W;    dX += col2im(col)
//        grad_weight  dW[Kg, RSCg] += dY^T . col
// where col = im2col(X) over the tile (csrc/cpu/im2col.h). A stride-1
// grad_input whose padding allows it runs instead as the forward conv of dY
// with the flipped, transposed weight (dgrad_as_forward below). A 1x1 / stride 1 /
// unpadded conv uses X (or dX) in place of col. The NCHW forward writes col
// straight into the GEMM core's packed-B layout (no separate packing pass;
// the tile's pixel count is then rounded up to the micro-tile width), except
// with Cg >= 16, where it runs the NHWC formulation on per-image transposes
// (via_nhwc).
//
// Workspace: one column buffer per thread of CgRS * tile elements, where
//   tmax   = max(64, budget / (CgRS * sizeof(T)))
//            (budget 512 KiB for forward (and stride-1 grad_input, which runs
//            as a forward conv; in the NHWC formulation up to a quarter of the
//            weight's bytes, at most 4 MiB), 256 KiB for other grad_input,
//            1 MiB for grad_weight)
//   ntiles = ceil(P*Q / tmax), raised to a multiple of the thread count (at
//            most P*Q / 64) when N * groups < threads and P*Q >= 128
//   tile   = min(P*Q, roundup16(ceil(P*Q / ntiles)))
// and none for pointwise convs or the Cg == 1 direct kernels. So <= ~budget
// per thread unless CgRS * 64 * sizeof(T) > budget, where the 64-pixel floor
// wins. When an image is one tile (small planes), the NHWC-formulation forward
// and grad_weight give one GEMM the tiles of as many images as tmax pixels
// hold (images_per_gemm), within the same budget (grad_weight: up to a quarter
// of the weight, 1-4 MiB), so a big weight or dW is streamed once per group
// of images; grad_weight on NCHW adds those images' dY planes side by side. An NCHW forward run through the NHWC GEMM (via_nhwc) adds per thread
// the transposed image, C*H*W elements (at most 2 MiB), and a Kg x tile
// result buffer, plus the weight permuted once per op.
// E.g. float, 2 threads, forward: 32x64x32x32 k3p1 -> 576 x 208 = 468 KiB/thread,
// (grad_weight: 576 x 352 = 792 KiB); 16x3x224x224 k7s2p3 -> 147 x 848 = 487
// KiB/thread; 64x6x14x14 k5 -> 150 x
// 100 = 59 KiB/thread. grad_weight adds (chunks - 1) partial copies of dW.
// Forward and grad_input also hold the weight packed for the GEMM core once
// per op (its size, rows rounded up to the micro-tile: 6 or 16), when more
// than one GEMM call shares it.
//
// Threads: work items (image, group, tile) are split into one chunk per
// thread when there are enough of them (the GEMM then runs single-threaded
// inside); otherwise the loop runs on the caller and the GEMM and im2col loops
// parallelise themselves. grad_input only splits over (image, group), since
// tiles of one image overlap in dX. grad_weight sums per-chunk partials in
// chunk order: deterministic for a given thread count. No atomics anywhere.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <type_traits>
#include <vector>

#include "alloc.h"
#include "common.h"
#include "conv2d.h"
#include "gemm.h"
#include "im2col.h"
#include "isa.h"

namespace fastlayers {
namespace {

using cpu::ConvShape;
using cpu::GemmArgs;

// Column-buffer budgets: forward and grad_input tiles stay within L2 (the
// GEMM then packs the tile while it is still there; the weight is packed
// once per op, so small tiles cost no repacking). grad_weight reduces over
// the tile's pixels, so its tiles are larger (fewer passes over dW).
// The forward's (whose im2col writes the packed layout, read once by the
// GEMM) measured 3-5 % faster at 512 KiB than at 256 KiB on the 3x3 bench
// convs (1 MiB: mixed).
constexpr int64_t kColBudgetBytes = int64_t(1) << 18;
constexpr int64_t kColBudgetBytesFwd = int64_t(1) << 19;
// NHWC forward with a weight over 2 MiB: tiles up to a quarter of the weight,
// at most 4 MiB (16x512x14x14 k3 -> 512, a 9 MiB weight: 1.19-1.23x faster
// with 2-4 MiB tiles than with 512 KiB ones in A/B; smaller weights: no change).
constexpr int64_t kColBudgetBytesFwdMax = int64_t(4) << 20;
constexpr int64_t kColBudgetBytesWgrad = int64_t(1) << 20;
// grad_weight: largest weight copied once per extra thread for the partial sums.
constexpr int64_t kWgradPartialBytes = int64_t(2) << 20;

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pixels per column-buffer tile (see the workspace note above). With fewer
// images*groups than threads, a large image is cut into a multiple of the
// thread count of tiles so the tiles can be spread over the threads.
// Most pixels a column buffer of `budget` bytes holds (at least 64).
int64_t tile_pixels_max(const ConvShape& s, int64_t elem_bytes, int64_t budget) {
  return std::max<int64_t>(64, budget / (std::max<int64_t>(1, s.CgRS()) * elem_bytes));
}

// Column budget of a GEMM that streams the whole weight once per tile: up to
// a quarter of the weight's bytes, at least `lo`, at most kColBudgetBytesFwdMax.
int64_t weight_scaled_budget(int64_t weight_bytes, int64_t lo) {
  return std::clamp(weight_bytes / 4, lo, kColBudgetBytesFwdMax);
}

// With one tile per image: how many images share a GEMM, as many as the
// budget's pixels hold at `width` pixels (columns) each, at most N.
int64_t images_per_gemm(const ConvShape& s, int64_t elem_bytes, int64_t budget, int64_t width) {
  const int64_t tmax = tile_pixels_max(s, elem_bytes, budget);
  return std::clamp<int64_t>(tmax / std::max<int64_t>(width, 1), 1, std::max<int64_t>(s.N, 1));
}

int64_t pixel_tile(const ConvShape& s, int64_t elem_bytes, bool split_for_threads,
                   int64_t budget = kColBudgetBytes) {
  const int64_t PQ = s.PQ();
  if (PQ == 0) return 1;
  const int64_t tmax = tile_pixels_max(s, elem_bytes, budget);
  int64_t ntiles = divup(PQ, tmax);
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (split_for_threads && s.N * s.G < nt && PQ >= 2 * 64) {
    ntiles = std::min(divup(ntiles, nt) * nt, std::max<int64_t>(1, PQ / 64));
  }
  int64_t tile = divup(PQ, ntiles);
  tile = std::min(PQ, divup(tile, 16) * 16);
  return tile;
}

// The weight of each group packed once for the GEMM core, reused by every
// image and pixel tile (otherwise each GEMM call would pack it again). As A
// ([Kg, CgRS] or its transpose) or as B; empty when there is one call only.
template <typename T>
struct PackedWeight {
  cpu::AlignedVector<T> buf;
  int64_t per = 0;  // elements per group
  PackedWeight(const ConvShape& s, int64_t calls, bool as_a, bool transposed, const T* w,
               cpu::Isa isa = cpu::gemm_isa()) {
    if (calls <= 1) return;
    const int64_t rowlen = s.CgRS();
    // W_g is [Kg, rowlen] row-major; W_g^T is [rowlen, Kg].
    const int64_t rows = transposed ? rowlen : s.Kg, cols = transposed ? s.Kg : rowlen;
    const int64_t rs = transposed ? 1 : rowlen, cs = transposed ? rowlen : 1;
    per = as_a ? cpu::gemm_packed_a_size<T>(rows, cols, isa)
               : cpu::gemm_packed_b_size<T>(rows, cols);
    buf.resize(per * s.G);
    for (int64_t g = 0; g < s.G; ++g) {
      const T* wg = w + g * s.Kg * rowlen;
      if (as_a) cpu::gemm_pack_a<T>(rows, cols, wg, rs, cs, buf.data() + g * per, isa);
      else cpu::gemm_pack_b<T>(rows, cols, wg, rs, cs, buf.data() + g * per);
    }
  }
  const T* group(int64_t g) const { return buf.empty() ? nullptr : buf.data() + g * per; }
};

// ---------------------------------------------------------------- forward

// Implicit GEMM for a forward with few input channels per group (the ResNet
// stem's 3), NCHW or channels-last: per output row, Y[Kg, Q] = W_g . B with B read straight
// from a block of input rows (gemm_implicit_b), no im2col. The block holds
// the rows a run of output rows needs, zero-padded and split by row and
// column phase of the stride, xs[c][a][b][i][u] = X_pad[c][(oh0 + i) sH + a][u sW + b]
// (X_pad: X with its padding), so tap (c, r, q) is B row k = c R S + r S + q
// at the constant offset
//   k_off = c CS + ((r dH mod sH) sW + q dW mod sW) PS + (r dH div sH) U + q dW div sW
// from output pixel (oh, ow)'s xs + (oh - oh0) U + ow, with U = Q + (S-1) dW div sW
// columns per phase row, PS = rows U, CS = sH sW PS. Output rows run in
// slivers of R lanes (16 on AVX2, 32 on AVX-512; an AVX-512 CPU runs the AVX2
// kernels where 16 lanes fit Q better, gemm_implicit_path), so a row of Q
// pixels computes Q rounded up to R; taken where that wastes at most 1/16
// (Q a multiple of 16 below 256), with a packed weight of at most
// kImplicitPackedAMax, else im2col.
// In-process A/B against the im2col path, 2 threads, float, Q % 16 == 0:
// 1.13-1.49x (16x3x224x224 k7s2p3 -> 64 1.26x, 16x3x32x32 k3p1 -> 64 1.22x,
// 16x4x64x64 k5p2 -> 40 1.49x, 16x15x32x32 -> 64 1.21x); with partial
// slivers (Q = 14, 20, 28, 56: the last one of each row through a
// temporary tile) 0.76-1.00x, hence the rule. With Cg >= 16 (where the
// NHWC route would run) it is taken for NCHW with Kg > 32 only: against
// via_nhwc 1.03-1.09x (32x64x32x32 -> 64, 8x64x64x64 -> 64, 32x32x32x32 ->
// 64); channels-last 0.74-0.96x (its block gathers channels C apart).
// gemm_implicit_b runs K blocks outside the row tiles, so a sliver's B rows
// of one KC block stay in L1 (all K inside: 0.97-1.02x against via_nhwc).
// Workspace per thread: the block, about kImplicitBlockBytes.
constexpr int64_t kImplicitBlockBytes = int64_t(1) << 17;
constexpr int64_t kImplicitPackedAMax = int64_t(1) << 18;

template <typename T>
bool implicit_ok(const ConvShape& s, bool cl) {
  if (s.pointwise()) return false;
  if (s.Cg >= 16 && (cl || s.Kg <= 32)) return false;  // see above
  const cpu::ImplicitPath path = cpu::gemm_implicit_path<T>(s.Q);
  const int64_t lanes = divup(s.Q, path.R) * path.R;
  return lanes * 16 <= s.Q * 17 &&
         cpu::gemm_packed_a_size<T>(s.Kg, s.CgRS(), path.isa) * int64_t(sizeof(T)) <=
             kImplicitPackedAMax;
}

inline int64_t ceil_pos(int64_t a, int64_t b) { return a <= 0 ? 0 : divup(a, b); }

// cl: x, w and y channels-last (w [K, R, S, Cg], so B row k = (r S + q) Cg + c;
// the tiles are stored transposed into y's pixel rows).
template <typename T>
void forward_implicit(const ConvShape& s, bool cl, const T* x, const T* w, const T* b, T* y) {
  const int64_t Fr = (s.R - 1) * s.dH / s.sH, Fq = (s.S - 1) * s.dW / s.sW;
  const cpu::ImplicitPath path = cpu::gemm_implicit_path<T>(s.Q);
  const int64_t U = s.Q + Fq, phases = s.sH * s.sW, lanes = path.R;
  // Output rows per block: the block within kImplicitBlockBytes, and at
  // least as many blocks as threads.
  const int64_t row_bytes = s.Cg * phases * U * int64_t(sizeof(T));
  int64_t rows = std::clamp<int64_t>(kImplicitBlockBytes / row_bytes - Fr, 1, s.P);
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (s.N * s.G < nt) rows = std::min(rows, divup(s.P, divup(nt, s.N * s.G)));
  const int64_t nrb = divup(s.P, rows), nrow = rows + Fr;
  const int64_t PS = nrow * U, CS = phases * PS;
  std::vector<int64_t> koff(s.CgRS());
  for (int64_t c = 0; c < s.Cg; ++c)
    for (int64_t r = 0; r < s.R; ++r)
      for (int64_t q = 0; q < s.S; ++q)
        koff[cl ? (r * s.S + q) * s.Cg + c : (c * s.R + r) * s.S + q] = c * CS +
            ((r * s.dH % s.sH) * s.sW + q * s.dW % s.sW) * PS + (r * s.dH / s.sH) * U +
            q * s.dW / s.sW;
  const PackedWeight<T> wpk(s, 2, true, false, w, path.isa);  // always packed (A of every call)
  const int64_t items = s.N * s.G * nrb;
  // Input element (c, ih, iw) of an image at c cs_c + ih rs_h + iw cs_w.
  const int64_t cs_c = cl ? 1 : s.HW(), rs_h = cl ? s.W * s.C : s.W, cs_w = cl ? s.C : 1;
  const int64_t step = s.sW * cs_w;
  cpu::run_chunks(items, [&](int64_t, int64_t i0, int64_t i1) {
    // Lanes past a row's Q read up to lanes - 1 elements beyond the block.
    cpu::UninitBuffer<T> xs(s.Cg * CS + lanes);
    std::fill(xs.data() + s.Cg * CS, xs.data() + s.Cg * CS + lanes, T(0));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t rb = i % nrb, g = (i / nrb) % s.G, n = i / nrb / s.G;
      const int64_t oh0 = rb * rows, oh1 = std::min(s.P, oh0 + rows);
      for (int64_t c = 0; c < s.Cg; ++c) {
        const T* xc = x + n * s.C * s.HW() + (g * s.Cg + c) * cs_c;
        for (int64_t a = 0; a < s.sH; ++a) {
          for (int64_t ph = 0; ph < s.sW; ++ph) {
            // Columns u whose input column u sW + ph - pW lies in [0, W).
            const int64_t lo = std::min(U, ceil_pos(s.pW - ph, s.sW));
            const int64_t hi = std::clamp(ceil_pos(s.W + s.pW - ph, s.sW), lo, U);
            T* d = xs.data() + c * CS + (a * s.sW + ph) * PS;
            for (int64_t r = 0; r < nrow; ++r, d += U) {
              const int64_t ih = (oh0 + r) * s.sH + a - s.pH;
              if (ih < 0 || ih >= s.H || lo == hi) {
                std::fill(d, d + U, T(0));
                continue;
              }
              const T* src = xc + ih * rs_h + (ph - s.pW) * cs_w;  // + u step: column u
              std::fill(d, d + lo, T(0));
              if (step == 1) std::memcpy(d + lo, src + lo, (hi - lo) * sizeof(T));
              else if (step == 2) for (int64_t u = lo; u < hi; ++u) d[u] = src[2 * u];
              else for (int64_t u = lo; u < hi; ++u) d[u] = src[u * step];
              std::fill(d + hi, d + U, T(0));
            }
          }
        }
      }
      cpu::ImplicitB<T> a;
      a.M = s.Kg; a.n = s.Q; a.K = s.CgRS();
      a.packed_A = wpk.group(g);
      a.k_off = koff.data();
      a.ldc = cl ? s.K : s.PQ();
      a.c_trans = cl;
      a.bias_m = b ? b + g * s.Kg : nullptr;
      a.isa = path.isa;
      a.R = lanes;
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        a.x = xs.data() + (oh - oh0) * U;
        a.C = cl ? y + (n * s.P + oh) * s.Q * s.K + g * s.Kg
                 : y + ((n * s.K + g * s.Kg) * s.P + oh) * s.Q;
        cpu::gemm_implicit_b(a);
      }
    }
  });
}

// via_nhwc: NCHW x and y, but the NHWC formulation (w is then channels-last,
// [K, R, S, Cg]; see via_nhwc()): each image is transposed to [HW, C] in a
// per-thread buffer, im2col'd in NHWC order (contiguous runs of Cg), and
// each tile's [pixels, Kg] result is transposed into the NCHW output. (The
// micro-kernels' transposed store straight into Y measured no faster than the
// NCHW path: on 32x32 planes its 16 channel runs lie 4 KiB apart, one L1 set.)
template <typename T>
void forward_gemm(const ConvShape& s, bool cl, const T* x, const T* w, const T* b, T* y,
                  bool via_nhwc = false) {
  if (!via_nhwc && implicit_ok<T>(s, cl)) return forward_implicit(s, cl, x, w, b, y);
  const int64_t rowlen = s.CgRS(), PQ = s.PQ(), HW = s.HW();
  const bool pw = s.pointwise();
  const bool nhwc = cl || via_nhwc;
  // NHWC: every tile's GEMM streams the whole (packed) weight from L3, so a
  // big weight gets bigger tiles, up to a quarter of its size.
  const int64_t wbytes = s.K * rowlen * int64_t(sizeof(T));
  const int64_t budget = nhwc ? weight_scaled_budget(wbytes, kColBudgetBytesFwd) : kColBudgetBytesFwd;
  const int64_t tile = pixel_tile(s, sizeof(T), true, budget), ntiles = divup(PQ, tile);
  // Small planes (one tile per image) in the NHWC formulation: the rows of
  // up to ipt images go into one GEMM, whose packed weight is then streamed
  // once per ipt images instead of once per image (8 x 512 x 4 x 4 k3p1:
  // 16 pixels a GEMM streamed a 9 MiB weight per image).
  const int64_t ipt = nhwc && ntiles == 1 ? images_per_gemm(s, sizeof(T), budget, PQ) : 1;
  const int64_t nblk = divup(s.N, ipt);
  // NCHW: A = W_g; NHWC: B = W_g^T.
  const PackedWeight<T> wpk(s, nblk * ntiles, !nhwc, nhwc, w);
  // NCHW: im2col writes the GEMM's packed-B layout directly.
  const cpu::PackedBLayout lay = cpu::gemm_packed_b_layout<T>(rowlen);
  const int64_t col_elems =
      pw ? 0 : nhwc ? rowlen * tile * ipt : cpu::gemm_packed_b_size<T>(rowlen, tile);
  cpu::run_chunks(nblk * s.G * ntiles, [&](int64_t, int64_t i0, int64_t i1) {
    // NHWC buffers are left uninitialised: every element the GEMM reads is
    // written first (im2col_nhwc writes whole rows, zeros included).
    cpu::AlignedVector<T> col_nchw(nhwc ? 0 : col_elems);
    cpu::UninitBuffer<T> col_nhwc(nhwc ? col_elems : 0);
    T* const colp = nhwc ? col_nhwc.data() : col_nchw.data();
    cpu::UninitBuffer<T> xt(via_nhwc ? ipt * s.C * HW : 0), yt(via_nhwc ? s.Kg * tile * ipt : 0);
    int64_t xt_image = -1;
    for (int64_t i = i0; i < i1; ++i) {
      // Images [n, n + ni) (ni > 1 only with one tile per image).
      const int64_t t = i % ntiles, g = (i / ntiles) % s.G, n = i / ntiles / s.G * ipt;
      const int64_t ni = std::min(ipt, s.N - n);
      const int64_t p0 = t * tile, p1 = std::min(PQ, p0 + tile), pn = p1 - p0;
      GemmArgs<T> a;
      a.K = rowlen;
      if (via_nhwc) {
        if (n != xt_image) {
          for (int64_t j = 0; j < ni; ++j)
            cpu::gemm_transpose<T>(s.C, HW, x + (n + j) * s.C * HW, HW,
                                   xt.data() + j * s.C * HW, s.C);
          xt_image = n;
        }
        a.M = ni * pn; a.N = s.Kg;
        for (int64_t j = 0; j < ni; ++j)
          cpu::im2col_nhwc(s, xt.data() + j * s.C * HW + g * s.Cg, p0, p1, colp + j * pn * rowlen);
        a.A = colp; a.rsA = rowlen; a.csA = 1;
        a.B = w + g * s.Kg * rowlen; a.rsB = 1; a.csB = rowlen;
        a.packed_B = wpk.group(g);
        a.bias_n = b ? b + g * s.Kg : nullptr;
        a.C = yt.data(); a.rsC = s.Kg; a.csC = 1;
        cpu::gemm(a);
        for (int64_t j = 0; j < ni; ++j)
          cpu::gemm_transpose<T>(pn, s.Kg, yt.data() + j * pn * s.Kg, s.Kg,
                                 y + ((n + j) * s.K + g * s.Kg) * PQ + p0, PQ);
        continue;
      } else if (!cl) {
        const T* xg = x + (n * s.C + g * s.Cg) * HW;
        a.M = s.Kg; a.N = pn;
        a.A = w + g * s.Kg * rowlen; a.rsA = rowlen; a.csA = 1;
        a.packed_A = wpk.group(g);
        if (pw) {
          a.B = xg + p0; a.rsB = HW; a.csB = 1;
        } else {
          cpu::im2col_nchw_packed(s, xg, p0, p1, lay, colp);
          a.packed_B = colp;
        }
        a.C = y + (n * s.K + g * s.Kg) * PQ + p0; a.rsC = PQ; a.csC = 1;
        a.bias_m = b ? b + g * s.Kg : nullptr;
      } else {
        // Rows (image, pixel) of the ni images follow each other in X (a
        // pointwise conv has HW == PQ) and in Y.
        const T* xn = x + n * HW * s.C + g * s.Cg;
        a.M = ni * pn; a.N = s.Kg;
        if (pw) {
          a.A = xn + p0 * s.C; a.rsA = s.C; a.csA = 1;
        } else {
          for (int64_t j = 0; j < ni; ++j)
            cpu::im2col_nhwc(s, xn + j * HW * s.C, p0, p1, colp + j * pn * rowlen);
          a.A = colp; a.rsA = rowlen; a.csA = 1;
        }
        a.B = w + g * s.Kg * rowlen; a.rsB = 1; a.csB = rowlen;
        a.packed_B = wpk.group(g);
        a.C = y + (n * PQ + p0) * s.K + g * s.Kg; a.rsC = s.K; a.csC = 1;
        a.bias_n = b ? b + g * s.Kg : nullptr;
      }
      cpu::gemm(a);
    }
  });
}

// ------------------------------------------------------------- grad_input

// dx must be zeroed beforehand unless s.pointwise().
template <typename T>
void grad_input_gemm(const ConvShape& s, bool cl, const T* dy, const T* w, T* dx) {
  const int64_t rowlen = s.CgRS(), PQ = s.PQ(), HW = s.HW();
  const bool pw = s.pointwise();
  const int64_t tile = pixel_tile(s, sizeof(T), false), ntiles = divup(PQ, tile);
  // NCHW: A = W_g^T; NHWC: B = W_g.
  const PackedWeight<T> wpk(s, s.N * ntiles, !cl, !cl, w);
  cpu::run_chunks(s.N * s.G, [&](int64_t, int64_t i0, int64_t i1) {
    cpu::AlignedVector<T> col(pw ? 0 : rowlen * tile);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i % s.G, n = i / s.G;
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t p0 = t * tile, p1 = std::min(PQ, p0 + tile), pn = p1 - p0;
        GemmArgs<T> a;
        a.K = s.Kg;
        if (!cl) {
          T* dxg = dx + (n * s.C + g * s.Cg) * HW;
          a.M = rowlen; a.N = pn;
          a.A = w + g * s.Kg * rowlen; a.rsA = 1; a.csA = rowlen;
          a.packed_A = wpk.group(g);
          a.B = dy + (n * s.K + g * s.Kg) * PQ + p0; a.rsB = PQ; a.csB = 1;
          if (pw) {
            a.C = dxg + p0; a.rsC = HW; a.csC = 1;
            cpu::gemm(a);
          } else {
            a.C = col.data(); a.rsC = pn; a.csC = 1;
            cpu::gemm(a);
            cpu::col2im_nchw(s, col.data(), p0, p1, dxg);
          }
        } else {
          T* dxn = dx + n * HW * s.C + g * s.Cg;
          a.M = pn; a.N = rowlen;
          a.A = dy + (n * PQ + p0) * s.K + g * s.Kg; a.rsA = s.K; a.csA = 1;
          a.B = w + g * s.Kg * rowlen; a.rsB = rowlen; a.csB = 1;
          a.packed_B = wpk.group(g);
          if (pw) {
            a.C = dxn + p0 * s.C; a.rsC = s.C; a.csC = 1;
            cpu::gemm(a);
          } else {
            a.C = col.data(); a.rsC = rowlen; a.csC = 1;
            cpu::gemm(a);
            cpu::col2im_nhwc(s, col.data(), p0, p1, dxn);
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------ grad_weight

// dw: [K, CgRS] (NCHW path, weight order c, r, s) or [K, RSCg] (NHWC path).
template <typename T>
void grad_weight_gemm(const ConvShape& s, bool cl, const T* dy, const T* x, T* dw) {
  const int64_t rowlen = s.CgRS(), PQ = s.PQ(), HW = s.HW(), wsize = s.K * rowlen;
  const bool pw = s.pointwise();
  const int64_t tile = pixel_tile(s, sizeof(T), true, kColBudgetBytesWgrad), ntiles = divup(PQ, tile);
  const int64_t ld = cpu::im2col_nchw_ld<T>(tile);  // NCHW column rows: pixels, padded
  // Small planes (one tile per image): the columns of up to ipt images side
  // by side, one GEMM reducing over all their pixels, so dW is read and
  // written once per ipt images instead of once per image (8 x 512 x 4 x 4
  // k3p1: a 9 MiB dW for 16 pixels a GEMM). Budget as the NHWC forward's:
  // up to a quarter of the weight, 1-4 MiB. Not for a pointwise NCHW conv
  // (X is read in place, its images are not adjacent).
  const int64_t ipt =
      ntiles == 1 && !(pw && !cl)
          ? images_per_gemm(s, sizeof(T),
                            weight_scaled_budget(wsize * int64_t(sizeof(T)), kColBudgetBytesWgrad),
                            cl ? PQ : ld)
          : 1;
  const int64_t nblk = divup(s.N, ipt);
  const int64_t items = nblk * s.G * ntiles;
  // A weight above kWgradPartialBytes gets no per-thread partial copies: the
  // items then run in order on the caller, and each GEMM (and im2col)
  // parallelises inside it.
  const bool split = wsize * int64_t(sizeof(T)) <= kWgradPartialBytes;
  const int64_t nchunks = split ? cpu::planned_chunks(items) : 1;
  // Chunk 0 accumulates straight into dw, chunk c > 0 into partial[c - 1].
  std::vector<T> partial(std::max<int64_t>(0, nchunks - 1) * wsize, T(0));
  std::fill(dw, dw + wsize, T(0));
  auto chunk = [&](int64_t c, int64_t i0, int64_t i1) {
    T* acc = c == 0 ? dw : partial.data() + (c - 1) * wsize;
    cpu::AlignedVector<T> col(pw ? 0 : rowlen * (cl ? tile : ld) * ipt);
    // NCHW, several images: their dY planes side by side, as the columns
    // (zeros in the padding columns, which meet zero columns of col).
    cpu::AlignedVector<T> dyb(!cl && ipt > 1 ? s.Kg * ld * ipt : 0);
    for (int64_t i = i0; i < i1; ++i) {
      // Images [n, n + ni) (ni > 1 only with one tile per image).
      const int64_t t = i % ntiles, g = (i / ntiles) % s.G, n = i / ntiles / s.G * ipt;
      const int64_t ni = std::min(ipt, s.N - n);
      const int64_t p0 = t * tile, p1 = std::min(PQ, p0 + tile), pn = p1 - p0;
      GemmArgs<T> a;
      a.M = s.Kg; a.N = rowlen; a.K = pn;
      if (!cl) {
        const T* xg = x + (n * s.C + g * s.Cg) * HW;
        a.A = dy + (n * s.K + g * s.Kg) * PQ + p0; a.rsA = PQ; a.csA = 1;
        if (pw) {
          a.B = xg + p0; a.rsB = 1; a.csB = HW;
        } else if (ipt > 1) {
          const int64_t lda = ni * ld;  // ld == im2col_nchw_ld(PQ): one tile per image
          for (int64_t j = 0; j < ni; ++j) {
            cpu::im2col_nchw(s, xg + j * s.C * HW, 0, PQ, col.data() + j * ld, lda);
            for (int64_t k = 0; k < s.Kg; ++k) {
              const T* src = dy + ((n + j) * s.K + g * s.Kg + k) * PQ;
              T* dst = dyb.data() + k * lda + j * ld;
              std::copy(src, src + PQ, dst);
              std::fill(dst + PQ, dst + ld, T(0));
            }
          }
          a.A = dyb.data(); a.rsA = lda; a.csA = 1;
          a.B = col.data(); a.rsB = 1; a.csB = lda;
          a.K = lda;
        } else {
          cpu::im2col_nchw(s, xg, p0, p1, col.data());
          a.B = col.data(); a.rsB = 1; a.csB = cpu::im2col_nchw_ld<T>(pn);
        }
      } else {
        // Rows (image, pixel) of the ni images follow each other in dY and X
        // (a pointwise conv has HW == PQ).
        const T* xn = x + n * HW * s.C + g * s.Cg;
        a.A = dy + (n * PQ + p0) * s.K + g * s.Kg; a.rsA = 1; a.csA = s.K;
        a.K = ni * pn;
        if (pw) {
          a.B = xn + p0 * s.C; a.rsB = s.C; a.csB = 1;
        } else {
          for (int64_t j = 0; j < ni; ++j)
            cpu::im2col_nhwc(s, xn + j * HW * s.C, p0, p1, col.data() + j * pn * rowlen);
          a.B = col.data(); a.rsB = rowlen; a.csB = 1;
        }
      }
      a.C = acc + g * s.Kg * rowlen; a.rsC = rowlen; a.csC = 1;
      a.accumulate = true;
      cpu::gemm(a);
    }
  };
  if (split) cpu::run_chunks(items, chunk);
  else chunk(0, 0, items);
  if (nchunks > 1) {
    at::parallel_for(0, wsize, 4096, [&](int64_t j0, int64_t j1) {
      for (int64_t c = 1; c < nchunks; ++c) {
        const T* p = partial.data() + (c - 1) * wsize;
        for (int64_t j = j0; j < j1; ++j) dw[j] += p[j];
      }
    });
  }
}

// -------------------------------------------------------------- grad_bias

// db[k] = sum over n, p, q of dY[n, k, p, q], accumulated in double.
template <typename T>
void grad_bias(const ConvShape& s, bool cl, const T* dy, T* db) {
  const int64_t PQ = s.PQ(), K = s.K;
  if (!cl) {
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double total = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const T* p = dy + (n * K + k) * PQ;
          double acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < PQ; ++j) acc += double(p[j]);
          total += acc;
        }
        db[k] = T(total);
      }
    });
    return;
  }
  const int64_t pixels = s.N * PQ, nchunks = cpu::planned_chunks(pixels);
  std::vector<double> partial(nchunks * K, 0.0);
  cpu::run_chunks(pixels, [&](int64_t c, int64_t j0, int64_t j1) {
    double* acc = partial.data() + c * K;
    for (int64_t j = j0; j < j1; ++j) {
      const T* p = dy + j * K;
      for (int64_t k = 0; k < K; ++k) acc[k] += double(p[k]);
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    double total = 0;
    for (int64_t c = 0; c < nchunks; ++c) total += partial[c * K + k];
    db[k] = T(total);
  }
}

// Small NCHW float convs with Cg > 1 and stride 1 (LeNet conv2, Kg <= 32)
// take the flat direct kernels of conv2d_small.cpp instead of im2col + GEMM,
// up to a budget for one image's planes. Measured against the GEMM path
// (in-process A/B, 2 threads): forward and grad_weight 1.2-2.5x faster up
// to 1 MiB (e.g. 8x32x56x56 -> 32: 1.35x / 1.44x); grad_input 1.1-1.6x up
// to ~330 KiB but 0.77-0.91x at 830-950 KiB, where the stride-1 GEMM path
// (dgrad_as_forward) is the better one.
constexpr int64_t kSmallBudget = int64_t(1) << 20;
constexpr int64_t kSmallBudgetGradInput = int64_t(1) << 19;

bool use_small(const ConvShape& s, bool cl, at::ScalarType t, int64_t budget = kSmallBudget) {
  return !cl && t == at::kFloat && s.Cg > 1 && cpu::active_isa() != cpu::Isa::Scalar &&
         cpu::small_conv_ok(s, budget);
}

// Run the small kernels when `on` (float only); return whether they ran.
template <typename T>
bool small_forward(const ConvShape& s, bool on, const T* x, const T* w, const T* b, T* y) {
  if constexpr (std::is_same_v<T, float>) {
    if (on) return cpu::small_forward_nchw(s, x, w, b, y), true;
  }
  return false;
}
template <typename T>
bool small_grad_input(const ConvShape& s, bool on, const T* dy, const T* w, T* dx) {
  if constexpr (std::is_same_v<T, float>) {
    if (on) return cpu::small_grad_input_nchw(s, dy, w, dx), true;
  }
  return false;
}
template <typename T>
bool small_grad_weight(const ConvShape& s, bool on, const T* dy, const T* x, T* dw, T* db) {
  if constexpr (std::is_same_v<T, float>) {
    if (on) return cpu::small_grad_weight_nchw(s, dy, x, dw, db), true;
  }
  return false;
}

// An NCHW forward whose output planes are small: its GEMM has the pixels on
// the 16-lane side, and a plane of 49 pixels (7x7) fills 64 lanes, so 23 % of
// the multiply-adds are padding. It runs in NHWC instead (via_nhwc below),
// pixels in 6-row micro-tiles (54 rows for 49). In-process A/B (then with
// whole-tensor layout copies), 2 threads: 1.10-1.19x on 7x7 planes with
// 128-512 channels.
bool nchw_via_nhwc(const ConvShape& s) {
  const int64_t PQ = s.PQ(), lanes = divup(PQ, 16) * 16;
  return s.Cg > 1 && PQ < 256 && lanes * 8 > PQ * 9;  // over 1/9 of the lanes padding
}

// An NCHW forward (or stride-1 grad_input run as one) with Cg >= 16 runs
// the NHWC formulation with in-cache layout transposes (forward_gemm's
// via_nhwc): its im2col copies runs of Cg channels, where the NCHW one
// builds 16-pixel slivers from shifted rows, which on 32x32 planes took a
// third as long as the GEMM itself. In-process A/B, 2 threads: forward
// 1.00-1.30x (32x64x32x32 1.11, 8x64x56x56 1.10, 16x32x28x28 s2 1.22),
// stride-1 grad_input 1.00-1.88x; with the weight permuted by weight_nhwc
// (not torch's layout copy) 1.01-1.21x on 1-16 images of 14x14 and 7x7
// with 256-512 channels. Images over kViaImageBytes stay NCHW (the
// transposed image is a per-thread buffer).
constexpr int64_t kViaImageBytes = int64_t(2) << 20;

template <typename T>
bool via_nhwc(const ConvShape& s) {
  // Whole images per thread (fewer images than threads: the NCHW path, whose
  // tiles and GEMMs parallelise, instead of one transposed copy per thread).
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (implicit_ok<T>(s, false)) return false;  // the implicit GEMM is faster there
  return !s.pointwise() && (s.Cg >= 16 || nchw_via_nhwc(s)) && s.N * s.G >= nt &&
         s.C * s.HW() * int64_t(sizeof(T)) <= kViaImageBytes;
}

// A dense NCHW weight [K, Cg, R, S] as [K, R, S, Cg] (channels-last memory),
// by per-output-channel transposes into a reused block (torch's layout copy
// took several ms for a 9 MiB weight).
template <typename T>
at::Tensor weight_nhwc(const at::Tensor& w, const ConvShape& s) {
  at::Tensor wl = cpu::empty({s.K, s.Cg, s.R, s.S},
                             w.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* src = w.const_data_ptr<T>();
  T* dst = wl.mutable_data_ptr<T>();
  const int64_t RS = s.RS(), n = s.CgRS();
  at::parallel_for(0, s.K, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)),
                   [&](int64_t k0, int64_t k1) {
                     for (int64_t k = k0; k < k1; ++k)
                       cpu::gemm_transpose<T>(s.Cg, RS, src + k * n, RS, dst + k * n, s.Cg);
                   });
  return wl;
}

// ------------------------------------------- grad_input as a forward conv

// With stride 1, grad_input is the forward convolution of dY with the
// weight flipped in (r, s) and transposed in (k, c) per group, padded by
// d * (kernel - 1) - p:
//   dX[n, c, h, w] = sum_{k, r, s} dY[n, k, h + pH - r dH, w + pW - s dW] W[k, c, r, s]
// so it runs on the forward path (packed im2col + GEMM, written straight
// into dX: no col2im, no zeroing of dX), whose GEMM
// reduces over Kg*R*S instead of only Kg. Needs that padding to be >= 0.
// The flipped weight is a weight-sized workspace, so only for weights up to
// kDgradFlipBytes (16x512x7x7 -> 512, a 9 MiB weight: the col2im path was 1.12x
// faster in fwd+bwd and its step peak 17 MiB instead of 34 MiB).
constexpr int64_t kDgradFlipBytes = int64_t(2) << 20;

bool dgrad_as_forward(const ConvShape& s, int64_t elem_bytes) {
  return s.sH == 1 && s.sW == 1 && !s.pointwise() && s.pH <= s.dH * (s.R - 1) &&
         s.pW <= s.dW * (s.S - 1) && s.Kg * s.RS() >= 32 &&
         s.K * s.CgRS() * elem_bytes <= kDgradFlipBytes;
}

// The forward problem of dgrad_as_forward: input dY [N, K, P, Q], weight
// [C, Kg, R, S], output dX [N, C, H, W].
ConvShape dgrad_forward_shape(const ConvShape& s) {
  ConvShape t = s;
  t.C = s.K; t.H = s.P; t.W = s.Q;
  t.K = s.C; t.P = s.H; t.Q = s.W;
  t.pH = s.dH * (s.R - 1) - s.pH;
  t.pW = s.dW * (s.S - 1) - s.pW;
  t.Cg = s.Kg; t.Kg = s.Cg;
  return t;
}

// W [K, Cg, R, S] -> W' [C, Kg, R, S]: W'[g Cg + c, k, r, s] = W[g Kg + k, c, R-1-r, S-1-s].
at::Tensor dgrad_forward_weight(const at::Tensor& weight, const ConvShape& s,
                                at::MemoryFormat fmt) {
  return weight.reshape({s.G, s.Kg, s.Cg, s.R, s.S})
      .flip({3, 4})
      .transpose(1, 2)
      .reshape({s.C, s.Kg, s.R, s.S})
      .contiguous(fmt);
}

// ----------------------------------------------------------------- checks

std::array<int64_t, 2> pair_arg(at::IntArrayRef v, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2, "fastlayers.", op, ": expected ", name, " to have 2 values, got ",
              v.size());
  return {v[0], v[1]};
}

ConvShape check_conv(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     const char* op) {
  check_float_dtype(input, op, "input");
  check_same(input, weight, op, "input", "weight");
  TORCH_CHECK(input.dim() == 4, "fastlayers.", op,
              ": expected 4-D input [N, C, H, W], but got input of size: ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "fastlayers.", op,
              ": expected 4-D weight [K, C/groups, R, S], but got weight of size: ",
              weight.sizes());
  const auto st = pair_arg(stride, op, "stride"), pd = pair_arg(padding, op, "padding"),
             dl = pair_arg(dilation, op, "dilation");
  TORCH_CHECK(st[0] > 0 && st[1] > 0, "fastlayers.", op,
              ": non-positive stride is not supported, got stride=", stride);
  TORCH_CHECK(pd[0] >= 0 && pd[1] >= 0, "fastlayers.", op,
              ": negative padding is not supported, got padding=", padding);
  TORCH_CHECK(dl[0] > 0 && dl[1] > 0, "fastlayers.", op,
              ": non-positive dilation is not supported, got dilation=", dilation);
  TORCH_CHECK(groups > 0, "fastlayers.", op, ": non-positive groups is not supported, got groups=",
              groups);
  ConvShape s;
  s.N = input.size(0); s.C = input.size(1); s.H = input.size(2); s.W = input.size(3);
  s.K = weight.size(0); s.R = weight.size(2); s.S = weight.size(3);
  s.sH = st[0]; s.sW = st[1]; s.pH = pd[0]; s.pW = pd[1]; s.dH = dl[0]; s.dW = dl[1];
  s.G = groups;
  TORCH_CHECK(s.K >= groups, "fastlayers.", op, ": Given groups=", groups,
              ", expected weight to be at least ", groups, " at dimension 0, but got weight of size ",
              weight.sizes(), " instead");
  TORCH_CHECK(s.K % groups == 0, "fastlayers.", op, ": Given groups=", groups,
              ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size ", weight.sizes(), " instead");
  TORCH_CHECK(s.C == weight.size(1) * groups, "fastlayers.", op, ": Given groups=", groups,
              ", weight of size ", weight.sizes(), ", expected input", input.sizes(), " to have ",
              weight.size(1) * groups, " channels, but got ", s.C, " channels instead");
  TORCH_CHECK(s.R > 0 && s.S > 0, "fastlayers.", op,
              ": kernel size must be positive, but got weight of size ", weight.sizes());
  const int64_t padH = s.H + 2 * s.pH, padW = s.W + 2 * s.pW;
  const int64_t kH = s.dH * (s.R - 1) + 1, kW = s.dW * (s.S - 1) + 1;
  TORCH_CHECK(padH >= kH && padW >= kW, "fastlayers.", op,
              ": Calculated padded input size per channel: (", padH, " x ", padW,
              "). Kernel size: (", kH, " x ", kW,
              "). Kernel size can't be greater than actual input size");
  TORCH_CHECK(s.N == 0 || s.C == 0 || (s.H > 0 && s.W > 0), "fastlayers.", op,
              ": Only zero batch or zero channel inputs are supported, but got input shape: ",
              input.sizes());
  s.P = (padH - kH) / s.sH + 1;
  s.Q = (padW - kW) / s.sW + 1;
  s.Cg = s.C / groups;
  s.Kg = s.K / groups;
  return s;
}

bool use_channels_last(const at::Tensor& input, const at::Tensor& weight) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
         weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// --------------------------------------------------------------------- ops

at::Tensor conv2d_forward(const at::Tensor& input, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (is_reduced(input) || is_reduced(weight) || is_reduced(bias)) {  // in float32 (common.h)
    check_same(input, weight, "conv2d", "input", "weight");
    if (bias.has_value() && bias->defined()) check_same(input, *bias, "conv2d", "input", "bias");
    return round_to(fastlayers::conv2d_forward(widen(input), widen(weight), widen(bias), stride, padding,
                                   dilation, groups),
                    input.scalar_type());
  }
  const ConvShape s = check_conv(input, weight, stride, padding, dilation, groups, "conv2d");
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor b;
  if (has_bias) {
    check_same(input, *bias, "conv2d", "input", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.K, "fastlayers.conv2d: Given weight of size ",
                weight.sizes(), ", expected bias to be 1-dimensional with ", s.K,
                " elements, but got bias of size ", bias->sizes(), " instead");
    b = bias->contiguous();
  }
  const bool cl = use_channels_last(input, weight);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = cpu::empty({s.N, s.K, s.P, s.Q}, input.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(fmt);
  // Cg == 1: [K, 1, R, S] is the same memory in both formats.
  const at::Tensor w = s.Cg == 1 ? weight.contiguous() : weight.contiguous(fmt);
  const bool small = use_small(s, cl, input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_conv2d_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    if (s.Cg == 1) {
      if (cl) cpu::direct_forward_nhwc(s, xp, wp, bp, yp);
      else cpu::direct_forward_nchw(s, xp, wp, bp, yp);
    } else if (small_forward(s, small, xp, wp, bp, yp)) {
      // The flat small kernels go ahead of via_nhwc. In-process A/B, 2
      // threads, 3x3 p1 (d2 where noted), small against via_nhwc: 1.3-1.7x
      // with Cg = 16-24 (8x16x28x28 -> 16, 8x64x28x28 g4, 8x96x28x28 g4,
      // 8x256x14x14 g16, 8x512x14x14 g32, 8x64x32x32 g4 d2), 1.0-1.5x with
      // Cg = 32 (32x32x32x32, 8x32x56x56, 16x64x14x14 g2, 16x128x14x14 g4).
    } else if (!cl && via_nhwc<scalar_t>(s)) {
      const at::Tensor wl = weight_nhwc<scalar_t>(w, s);
      forward_gemm(s, false, xp, wl.const_data_ptr<scalar_t>(), bp, yp, true);
    } else {
      forward_gemm(s, cl, xp, wp, bp, yp);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> mask) {
  const char* op = "conv2d_backward";
  if (is_reduced(grad_output) || is_reduced(input) || is_reduced(weight)) {
    check_same(input, weight, op, "input", "weight");
    check_same(input, grad_output, op, "input", "grad_output");
    auto [gi, gw, gb] = fastlayers::conv2d_backward(widen(grad_output), widen(input), widen(weight), stride,
                                        padding, dilation, groups, mask);
    const at::ScalarType st = input.scalar_type();
    return {round_to(gi, st), round_to(gw, st), round_to(gb, st)};
  }
  const ConvShape s = check_conv(input, weight, stride, padding, dilation, groups, op);
  check_same(input, grad_output, op, "input", "grad_output");
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.K &&
                  grad_output.size(2) == s.P && grad_output.size(3) == s.Q,
              "fastlayers.", op, ": grad_output has size ", grad_output.sizes(), ", expected [",
              s.N, ", ", s.K, ", ", s.P, ", ", s.Q, "]");
  const bool cl = use_channels_last(input, weight);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const bool direct = s.Cg == 1;
  const bool small = use_small(s, cl, input.scalar_type());  // grad_weight
  const bool small_gi = use_small(s, cl, input.scalar_type(), kSmallBudgetGradInput);
  const bool work = s.N > 0 && s.P > 0 && s.Q > 0;
  at::Tensor gi = no_grad_placeholder(input), gw = no_grad_placeholder(input),
             gb = no_grad_placeholder(input);  // distinct: outputs must not alias
  at::Tensor dy, x, w;
  if (work) dy = grad_output.contiguous(fmt);

  if (mask[0]) {
    const auto opts = input.options().memory_format(fmt);
    const bool as_fwd = !direct && !small_gi && dgrad_as_forward(s, input.element_size());
    bool via = false;  // the forward problem through the NHWC GEMM
    if (as_fwd && !cl) {
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_conv2d_route", [&] {
        via = via_nhwc<scalar_t>(dgrad_forward_shape(s));
      });
    }
    const bool overwrite = work && (direct || small_gi || as_fwd || s.pointwise()) && s.C > 0;
    // (at::zeros would drop the memory format.)
    gi = cpu::empty({s.N, s.C, s.H, s.W}, opts);
    if (!overwrite) gi.zero_();
    if (work && s.C > 0) {
      w = direct ? weight.contiguous()
          : as_fwd ? dgrad_forward_weight(weight, s, via ? at::MemoryFormat::ChannelsLast : fmt)
                   : weight.contiguous(fmt);
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_conv2d_grad_input", [&] {
        const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
        const scalar_t* wp = w.const_data_ptr<scalar_t>();
        scalar_t* dxp = gi.mutable_data_ptr<scalar_t>();
        if (direct) {
          if (cl) cpu::direct_grad_input_nhwc(s, dyp, wp, dxp);
          else cpu::direct_grad_input_nchw(s, dyp, wp, dxp);
        } else if (as_fwd) {
          forward_gemm(dgrad_forward_shape(s), cl, dyp, wp, static_cast<const scalar_t*>(nullptr),
                       dxp, via);
        } else if (!small_grad_input(s, small_gi, dyp, wp, dxp)) {
          grad_input_gemm(s, cl, dyp, wp, dxp);
        }
      });
    }
  }

  // The NCHW direct grad_weight kernel may produce the bias gradient in the
  // same pass over dY (bias_done then says so).
  bool bias_done = false;
  if (mask[2]) gb = at::zeros({s.K}, weight.options());

  if (mask[1]) {
    // Same strides as weight when it is dense, else its suggested memory format.
    gw = at::empty_like(weight);
    if (!work) gw.zero_();
    if (work && gw.numel() > 0) {
      x = input.contiguous(fmt);
      // The kernels write [K, Cg, R, S] in the path's layout (NHWC path: [K, R, S, Cg]).
      const auto kfmt = direct ? at::MemoryFormat::Contiguous : fmt;
      at::Tensor buf = gw.is_contiguous(kfmt) ? gw
                                              : at::empty(weight.sizes(),
                                                          weight.options().memory_format(kfmt));
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_conv2d_grad_weight", [&] {
        const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* dwp = buf.mutable_data_ptr<scalar_t>();
        if (direct) {
          if (cl) cpu::direct_grad_weight_nhwc(s, dyp, xp, dwp);
          else
            bias_done = cpu::direct_grad_weight_nchw(
                s, dyp, xp, dwp, mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr);
        } else if (small_grad_weight(s, small, dyp, xp, dwp,
                                     mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr)) {
          bias_done = mask[2];
        } else {
          grad_weight_gemm(s, cl, dyp, xp, dwp);
        }
      });
      if (!buf.is_same(gw)) gw.copy_(buf);
    }
  }

  if (mask[2] && !bias_done) {
    if (work) {
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_conv2d_grad_bias", [&] {
        grad_bias(s, cl, dy.const_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>());
      });
    }
  }
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("conv2d_forward", &conv2d_forward);
  m.impl("conv2d_backward", &conv2d_backward);
}

}  // namespace fastlayers
