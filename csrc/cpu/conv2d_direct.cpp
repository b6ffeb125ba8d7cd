// Direct Conv2d kernels for Cg == 1 (depthwise convs, channel multipliers and
// single-channel inputs such as LeNet's conv1): output channel k reads input
// channel c = k / Kg only, so a GEMM would have an inner dimension of just
// R*S. These loops run along a contiguous dimension (W for NCHW, channels for
// NHWC) so the compiler vectorises them.
//
//  NCHW  forward      per (n, k) plane: y_row += w[k, r, s] * x_row (shifted)
//        grad_input   per (n, c) plane: dx_row += w[k, r, s] * dy_row (scatter)
//        grad_weight  per (k, r, s):   dw = sum over n, oh of dot(dy_row, x_row)
//  NHWC  forward      per (n, oh) row: y[pix, :] += w[r, s, :] * x[pix', :]
//        grad_input   per (n, ih) row, gathering the (oh, ow) that reach it
//        grad_weight  per-chunk partial sums over (n, oh) rows, summed in chunk order
// Every write target belongs to one thread: deterministic, no atomics.
//
// Fast NCHW float path (AVX2, used when active_isa() != Scalar and sW == 1):
// each plane is first copied into a zero-padded buffer, so every tap reads
// an in-bounds row and the loops have no edge cases. Output rows are computed
// in blocks of up to 8 ymm (64 columns) held in registers, each filter tap a
// broadcast scalar:  acc[v] += w[r, q] * xpad[oh*sH + r*dH][ow0 + 8v + q*dW].
// Short rows take several rows per block, or (forward, channel multipliers)
// four filters sharing each input load, to keep enough accumulators busy.
// grad_input (stride 1) is the same correlation of zero-padded dY with the
// flipped filter; grad_weight keeps S lane-wise accumulators per filter row
// and sums them per plane; planes are summed over images in fixed blocks of
// images (in double), so the result does not depend on the thread count.
// Otherwise (double, the scalar ISA, sW > 1, grad_input with sH > 1) the plain
// loops run.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "conv2d.h"
#include "isa.h"

namespace fastlayers::cpu {
namespace {

// Weight [K, R, S] -> [R, S, K] so that NHWC loops read it along k.
template <typename T>
std::vector<T> weight_rsk(const ConvShape& s, const T* w) {
  const int64_t RS = s.RS();
  std::vector<T> wt(RS * s.K);
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t j = 0; j < RS; ++j) wt[j * s.K + k] = w[k * RS + j];
  return wt;
}

int64_t plane_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

int64_t round8(int64_t v) { return (v + 7) / 8 * 8; }

// Copies the plane src [rows, cols] into buf [brows, bcols] with src[0][0]
// landing at buf[r0][c0] (r0, c0 may be negative: src is cropped); the rest
// of buf is zero.
void pad_plane(const float* src, int64_t rows, int64_t cols, int64_t r0, int64_t c0,
               float* buf, int64_t brows, int64_t bcols) {
  const int64_t clo = std::max<int64_t>(0, c0), chi = std::min(bcols, c0 + cols);
  for (int64_t a = 0; a < brows; ++a) {
    float* d = buf + a * bcols;
    const int64_t sr = a - r0;
    if (sr < 0 || sr >= rows || chi <= clo) {
      std::fill(d, d + bcols, 0.f);
      continue;
    }
    std::fill(d, d + clo, 0.f);
    std::copy(src + sr * cols + (clo - c0), src + sr * cols + (chi - c0), d + clo);
    std::fill(d + chi, d + bcols, 0.f);
  }
}

// Geometry of one padded-plane correlation: out[oh][ow] (+)= sum over r, q of
// f[r*S + q] * buf[oh*sH + r*dH][ow + q*dW], for oh < P, ow < Q.
struct PlaneConv {
  int64_t R, S, sH, dH, dW;
  int64_t P, Q;
  int64_t bcols;  // >= round8(Q) + (S - 1) * dW
};

// Buffer shapes for the three passes (rows, cols).
int64_t fwd_brows(const ConvShape& s) {
  return std::max(s.H + s.pH, (s.P - 1) * s.sH + (s.R - 1) * s.dH + 1);
}
int64_t fwd_bcols(const ConvShape& s) {
  return std::max(s.W + s.pW, round8(s.Q) + (s.S - 1) * s.dW);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline __m256i tail_mask(int64_t n) {  // lanes [0, n) set, 1 <= n <= 8
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), idx);
}

// One block of NR output rows oh .. oh+NR-1 x NV vectors from column ow0 (NR
// rows give short rows enough independent accumulators to hide the FMA
// latency); the last vector of each row keeps `last` lanes.
template <int NV, int NR>
inline void corr_block(const PlaneConv& g, const float* buf, const float* f, int64_t oh,
                       int64_t ow0, int64_t last, bool accumulate, float init, float* out) {
  __m256 acc[NR][NV];
  const __m256i m = tail_mask(last);
  for (int h = 0; h < NR; ++h)
    for (int v = 0; v < NV; ++v) {
      const float* o = out + h * g.Q + 8 * v;
      if (!accumulate) acc[h][v] = _mm256_set1_ps(init);
      else if (v < NV - 1 || last == 8) acc[h][v] = _mm256_loadu_ps(o);
      else acc[h][v] = _mm256_maskload_ps(o, m);
    }
  for (int64_t r = 0; r < g.R; ++r) {
    const float* row = buf + (oh * g.sH + r * g.dH) * g.bcols + ow0;
    for (int64_t q = 0; q < g.S; ++q) {
      const __m256 wv = _mm256_set1_ps(f[r * g.S + q]);
      const float* p = row + q * g.dW;
      for (int h = 0; h < NR; ++h)
        for (int v = 0; v < NV; ++v)
          acc[h][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(p + h * g.sH * g.bcols + 8 * v), acc[h][v]);
    }
  }
  for (int h = 0; h < NR; ++h) {
    float* o = out + h * g.Q;
    for (int v = 0; v < NV - 1; ++v) _mm256_storeu_ps(o + 8 * v, acc[h][v]);
    if (last == 8) _mm256_storeu_ps(o + 8 * (NV - 1), acc[h][NV - 1]);
    else _mm256_maskstore_ps(o + 8 * (NV - 1), m, acc[h][NV - 1]);
  }
}

// Rows of one column block: groups of NR rows, then single rows.
template <int NV, int NR>
inline void corr_rows(const PlaneConv& g, const float* buf, const float* f, int64_t ow0,
                      int64_t last, bool accumulate, float init, float* out) {
  int64_t oh = 0;
  if constexpr (NR > 1) {
    for (; oh + NR <= g.P; oh += NR)
      corr_block<NV, NR>(g, buf, f, oh, ow0, last, accumulate, init, out + oh * g.Q + ow0);
  }
  for (; oh < g.P; ++oh)
    corr_block<NV, 1>(g, buf, f, oh, ow0, last, accumulate, init, out + oh * g.Q + ow0);
}

// out [P, Q] = init + correlation (or out += correlation when accumulate).
void corr_plane_avx2(const PlaneConv& g, const float* buf, const float* f, bool accumulate,
                     float init, float* out) {
  for (int64_t ow0 = 0; ow0 < g.Q; ow0 += 64) {
    const int64_t n = std::min<int64_t>(64, g.Q - ow0), nv = (n + 7) / 8, last = n - 8 * (nv - 1);
    switch (nv) {
      case 1: corr_rows<1, 8>(g, buf, f, ow0, last, accumulate, init, out); break;
      case 2: corr_rows<2, 6>(g, buf, f, ow0, last, accumulate, init, out); break;
      case 3: corr_rows<3, 4>(g, buf, f, ow0, last, accumulate, init, out); break;
      case 4: corr_rows<4, 3>(g, buf, f, ow0, last, accumulate, init, out); break;
      case 5: corr_rows<5, 2>(g, buf, f, ow0, last, accumulate, init, out); break;
      case 6: corr_rows<6, 2>(g, buf, f, ow0, last, accumulate, init, out); break;
      case 7: corr_rows<7, 1>(g, buf, f, ow0, last, accumulate, init, out); break;
      default: corr_rows<8, 1>(g, buf, f, ow0, last, accumulate, init, out); break;
    }
  }
}

// Four filters f + i*RS (i < 4) on one output row: the input loads are shared
// by the filters (channel multipliers with short rows, e.g. LeNet's conv1).
template <int NV>
inline void corr4_block(const PlaneConv& g, const float* buf, const float* f, const float* init,
                        int64_t oh, int64_t last, int64_t PQ, float* out) {
  const int64_t RS = g.R * g.S;
  const __m256i m = tail_mask(last);
  __m256 acc[4][NV];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_set1_ps(init[i]);
  for (int64_t r = 0; r < g.R; ++r) {
    const float* row = buf + (oh * g.sH + r * g.dH) * g.bcols;
    for (int64_t q = 0; q < g.S; ++q) {
      __m256 xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(row + q * g.dW + 8 * v);
      for (int i = 0; i < 4; ++i) {
        const __m256 wv = _mm256_set1_ps(f[i * RS + r * g.S + q]);
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(wv, xv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    float* o = out + i * PQ + oh * g.Q;
    for (int v = 0; v < NV - 1; ++v) _mm256_storeu_ps(o + 8 * v, acc[i][v]);
    if (last == 8) _mm256_storeu_ps(o + 8 * (NV - 1), acc[i][NV - 1]);
    else _mm256_maskstore_ps(o + 8 * (NV - 1), m, acc[i][NV - 1]);
  }
}

// Four output planes at once (out + i*PQ); needs Q <= 24.
void corr4_plane_avx2(const PlaneConv& g, const float* buf, const float* f, const float* init,
                      int64_t PQ, float* out) {
  const int64_t nv = (g.Q + 7) / 8, last = g.Q - 8 * (nv - 1);
  for (int64_t oh = 0; oh < g.P; ++oh) {
    if (nv == 1) corr4_block<1>(g, buf, f, init, oh, last, PQ, out);
    else if (nv == 2) corr4_block<2>(g, buf, f, init, oh, last, PQ, out);
    else corr4_block<3>(g, buf, f, init, oh, last, PQ, out);
  }
}

inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// Filter taps q0 .. q0+NQ-1 of filter rows r0 .. r0+NR-1:
//   df[r*S + q] += sum over oh, ow of dy[oh][ow] * buf[oh*sH + r*dH][ow + q*dW].
// NR * NQ accumulators (at most 12): each dy load serves them all, and that many
// independent FMA chains keep both FMA pipes busy (3 chains left them waiting on
// the FMA latency). Each sum runs in the order it had with one row per pass.
template <int NR, int NQ>
inline void wgrad_taps(const PlaneConv& g, const float* buf, const float* dy, int64_t r0,
                       int64_t q0, double* df) {
  __m256 acc[NR][NQ];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NQ; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t nfull = g.Q / 8, rem = g.Q % 8, rstep = g.dH * g.bcols;
  const __m256i m = tail_mask(rem == 0 ? 8 : rem);
  for (int64_t oh = 0; oh < g.P; ++oh) {
    const float* d = dy + oh * g.Q;
    const float* row = buf + (oh * g.sH + r0 * g.dH) * g.bcols + q0 * g.dW;
    for (int64_t v = 0; v < nfull; ++v) {
      const __m256 dv = _mm256_loadu_ps(d + 8 * v);
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < NQ; ++j)
          acc[i][j] = _mm256_fmadd_ps(dv, _mm256_loadu_ps(row + i * rstep + 8 * v + j * g.dW), acc[i][j]);
    }
    if (rem) {
      const __m256 dv = _mm256_maskload_ps(d + 8 * nfull, m);  // zero past Q
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < NQ; ++j)
          acc[i][j] = _mm256_fmadd_ps(dv, _mm256_loadu_ps(row + i * rstep + 8 * nfull + j * g.dW), acc[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NQ; ++j) df[(r0 + i) * g.S + q0 + j] += double(hsum(acc[i][j]));
}

// Every filter row for taps q0 .. q0+NQ-1: as many rows per pass as 12 accumulators allow.
template <int NQ>
void wgrad_rows(const PlaneConv& g, const float* buf, const float* dy, int64_t q0, double* df) {
  constexpr int NR = NQ <= 4 ? 3 : NQ <= 6 ? 2 : 1;
  int64_t r = 0;
  for (; r + NR <= g.R; r += NR) wgrad_taps<NR, NQ>(g, buf, dy, r, q0, df);
  if constexpr (NR == 3)
    if (g.R - r == 2) { wgrad_taps<2, NQ>(g, buf, dy, r, q0, df); r += 2; }
  if (r < g.R) wgrad_taps<1, NQ>(g, buf, dy, r, q0, df);
}

void wgrad_plane_avx2(const PlaneConv& g, const float* buf, const float* dy, double* df) {
  for (int64_t q0 = 0; q0 < g.S; q0 += 8) {
    switch (std::min<int64_t>(8, g.S - q0)) {
      case 1: wgrad_rows<1>(g, buf, dy, q0, df); break;
      case 2: wgrad_rows<2>(g, buf, dy, q0, df); break;
      case 3: wgrad_rows<3>(g, buf, dy, q0, df); break;
      case 4: wgrad_rows<4>(g, buf, dy, q0, df); break;
      case 5: wgrad_rows<5>(g, buf, dy, q0, df); break;
      case 6: wgrad_rows<6>(g, buf, dy, q0, df); break;
      case 7: wgrad_rows<7>(g, buf, dy, q0, df); break;
      default: wgrad_rows<8>(g, buf, dy, q0, df); break;
    }
  }
}

// Sum of a dense plane of n floats.
float plane_sum_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
  }
  float t = hsum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) t += p[i];
  return t;
}

#pragma GCC pop_options

bool use_avx2_nchw(const ConvShape& s) { return s.sW == 1 && active_isa() != Isa::Scalar; }

// -- fast NCHW float passes (callers check use_avx2_nchw) --

void forward_nchw_avx2(const ConvShape& s, const float* x, const float* w, const float* b,
                       float* y) {
  const int64_t brows = fwd_brows(s), bcols = fwd_bcols(s), PQ = s.PQ();
  const PlaneConv g{s.R, s.S, s.sH, s.dH, s.dW, s.P, s.Q, bcols};
  at::parallel_for(0, s.N * s.C, plane_grain(PQ * s.RS() * s.Kg), [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(brows * bcols);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.C, c = i % s.C;
      pad_plane(x + i * s.HW(), s.H, s.W, s.pH, s.pW, buf.data(), brows, bcols);
      int64_t j = 0;
      if (s.Q <= 24) {  // short rows: four filters share each input load
        for (; j + 4 <= s.Kg; j += 4) {
          const int64_t k = c * s.Kg + j;
          const float init[4] = {b ? b[k] : 0.f, b ? b[k + 1] : 0.f, b ? b[k + 2] : 0.f,
                                 b ? b[k + 3] : 0.f};
          corr4_plane_avx2(g, buf.data(), w + k * s.RS(), init, PQ, y + (n * s.K + k) * PQ);
        }
      }
      for (; j < s.Kg; ++j) {
        const int64_t k = c * s.Kg + j;
        corr_plane_avx2(g, buf.data(), w + k * s.RS(), false, b ? b[k] : 0.f,
                        y + (n * s.K + k) * PQ);
      }
    }
  });
}

// Stride 1 only: dx[ih][iw] = sum over r, q of w[R-1-r][S-1-q] * pad(dy)[ih + r*dH][iw + q*dW].
void grad_input_nchw_avx2(const ConvShape& s, const float* dy, const float* w, float* dx) {
  const int64_t RS = s.RS(), PQ = s.PQ();
  const int64_t brows = s.H + (s.R - 1) * s.dH, bcols = round8(s.W) + (s.S - 1) * s.dW;
  const int64_t r0 = (s.R - 1) * s.dH - s.pH, c0 = (s.S - 1) * s.dW - s.pW;
  const PlaneConv g{s.R, s.S, 1, s.dH, s.dW, s.H, s.W, bcols};
  std::vector<float> wf(s.K * RS);  // flipped filters
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t j = 0; j < RS; ++j) wf[k * RS + j] = w[k * RS + RS - 1 - j];
  at::parallel_for(0, s.N * s.C, plane_grain(s.HW() * RS * s.Kg), [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(brows * bcols);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.C, c = i % s.C;
      for (int64_t j = 0; j < s.Kg; ++j) {
        const int64_t k = c * s.Kg + j;
        pad_plane(dy + (n * s.K + k) * PQ, s.P, s.Q, r0, c0, buf.data(), brows, bcols);
        corr_plane_avx2(g, buf.data(), wf.data() + k * RS, j > 0, 0.f, dx + i * s.HW());
      }
    }
  });
}

// Images are summed in nblk fixed blocks (independent of the thread count);
// work items are (k, block), each writing its own partial row.
void grad_weight_nchw_avx2(const ConvShape& s, const float* dy, const float* x, float* dw,
                           float* db) {
  const int64_t RS = s.RS(), PQ = s.PQ(), HW = s.HW(), wl = RS + 1;
  const int64_t brows = fwd_brows(s), bcols = fwd_bcols(s);
  const PlaneConv g{s.R, s.S, s.sH, s.dH, s.dW, s.P, s.Q, bcols};
  const int64_t nblk = std::min<int64_t>(s.N, 16);
  std::vector<double> part(s.K * nblk * wl, 0.0);  // [k][block][r, s | bias]
  at::parallel_for(0, s.K * nblk, std::max<int64_t>(1, plane_grain(PQ * RS) / std::max<int64_t>(1, s.N / nblk)),
                   [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(brows * bcols);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i / nblk, blk = i % nblk, c = k / s.Kg;
      double* acc = part.data() + i * wl;
      for (int64_t n = blk * s.N / nblk; n < (blk + 1) * s.N / nblk; ++n) {
        const float* dyp = dy + (n * s.K + k) * PQ;
        pad_plane(x + (n * s.C + c) * HW, s.H, s.W, s.pH, s.pW, buf.data(), brows, bcols);
        wgrad_plane_avx2(g, buf.data(), dyp, acc);
        if (db) acc[RS] += double(plane_sum_avx2(dyp, PQ));
      }
    }
  });
  for (int64_t k = 0; k < s.K; ++k) {
    for (int64_t j = 0; j < wl; ++j) {
      if (j == RS && !db) break;
      double t = 0;
      for (int64_t blk = 0; blk < nblk; ++blk) t += part[(k * nblk + blk) * wl + j];
      if (j < RS) dw[k * RS + j] = float(t);
      else db[k] = float(t);
    }
  }
}

}  // namespace

template <typename T>
void direct_forward_nchw(const ConvShape& s, const T* x, const T* w, const T* b, T* y) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx2_nchw(s)) return forward_nchw_avx2(s, x, w, b, y);
  }
  const int64_t PQ = s.PQ(), HW = s.HW(), RS = s.RS();
  at::parallel_for(0, s.N * s.K, plane_grain(PQ * RS), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.K, k = i % s.K, c = k / s.Kg;
      const T* xc = x + (n * s.C + c) * HW;
      const T* wk = w + k * RS;
      const T bv = b ? b[k] : T(0);
      for (int64_t oh = 0; oh < s.P; ++oh) {
        T* __restrict__ yr = y + i * PQ + oh * s.Q;
        std::fill(yr, yr + s.Q, bv);
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t off = q * s.dW - s.pW;
            int64_t lo, hi;
            valid_range(off, s.sW, s.W, s.Q, lo, hi);
            const T wv = wk[r * s.S + q];
            const T* __restrict__ xr = xc + ih * s.W + off;
            if (s.sW == 1) {
              for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow];
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * s.sW];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void direct_forward_nhwc(const ConvShape& s, const T* x, const T* w, const T* b, T* y) {
  const int64_t K = s.K, C = s.C, Kg = s.Kg;
  const std::vector<T> wt = weight_rsk(s, w);
  at::parallel_for(0, s.N * s.P, plane_grain(s.Q * s.RS() * K), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.P, oh = i % s.P;
      for (int64_t ow = 0; ow < s.Q; ++ow) {
        T* __restrict__ yp = y + (i * s.Q + ow) * K;
        for (int64_t k = 0; k < K; ++k) yp[k] = b ? b[k] : T(0);
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t iw = ow * s.sW - s.pW + q * s.dW;
            if (iw < 0 || iw >= s.W) continue;
            const T* __restrict__ xp = x + ((n * s.H + ih) * s.W + iw) * C;
            const T* __restrict__ wr = wt.data() + (r * s.S + q) * K;
            if (Kg == 1) {
              for (int64_t k = 0; k < K; ++k) yp[k] += wr[k] * xp[k];
            } else {
              for (int64_t c = 0; c < C; ++c)
                for (int64_t j = 0; j < Kg; ++j) yp[c * Kg + j] += wr[c * Kg + j] * xp[c];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void direct_grad_input_nchw(const ConvShape& s, const T* dy, const T* w, T* dx) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx2_nchw(s) && s.sH == 1) return grad_input_nchw_avx2(s, dy, w, dx);
  }
  const int64_t PQ = s.PQ(), HW = s.HW(), RS = s.RS();
  at::parallel_for(0, s.N * s.C, plane_grain(PQ * RS * s.Kg), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.C, c = i % s.C;
      T* dxc = dx + i * HW;
      std::fill(dxc, dxc + HW, T(0));
      for (int64_t j = 0; j < s.Kg; ++j) {
        const int64_t k = c * s.Kg + j;
        const T* dyk = dy + (n * s.K + k) * PQ;
        const T* wk = w + k * RS;
        for (int64_t oh = 0; oh < s.P; ++oh) {
          const T* __restrict__ dyr = dyk + oh * s.Q;
          for (int64_t r = 0; r < s.R; ++r) {
            const int64_t ih = oh * s.sH - s.pH + r * s.dH;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t q = 0; q < s.S; ++q) {
              const int64_t off = q * s.dW - s.pW;
              int64_t lo, hi;
              valid_range(off, s.sW, s.W, s.Q, lo, hi);
              const T wv = wk[r * s.S + q];
              T* __restrict__ xr = dxc + ih * s.W + off;
              if (s.sW == 1) {
                for (int64_t ow = lo; ow < hi; ++ow) xr[ow] += wv * dyr[ow];
              } else {
                for (int64_t ow = lo; ow < hi; ++ow) xr[ow * s.sW] += wv * dyr[ow];
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
void direct_grad_input_nhwc(const ConvShape& s, const T* dy, const T* w, T* dx) {
  const int64_t K = s.K, C = s.C, Kg = s.Kg;
  const std::vector<T> wt = weight_rsk(s, w);
  at::parallel_for(0, s.N * s.H, plane_grain(s.W * s.RS() * K), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.H, ih = i % s.H;
      for (int64_t iw = 0; iw < s.W; ++iw) {
        T* __restrict__ dxp = dx + (i * s.W + iw) * C;
        std::fill(dxp, dxp + C, T(0));
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t th = ih + s.pH - r * s.dH;  // = oh * sH
          if (th < 0 || th % s.sH != 0 || th / s.sH >= s.P) continue;
          const int64_t oh = th / s.sH;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t tw = iw + s.pW - q * s.dW;  // = ow * sW
            if (tw < 0 || tw % s.sW != 0 || tw / s.sW >= s.Q) continue;
            const int64_t ow = tw / s.sW;
            const T* __restrict__ dyp = dy + ((n * s.P + oh) * s.Q + ow) * K;
            const T* __restrict__ wr = wt.data() + (r * s.S + q) * K;
            if (Kg == 1) {
              for (int64_t c = 0; c < C; ++c) dxp[c] += wr[c] * dyp[c];
            } else {
              for (int64_t c = 0; c < C; ++c) {
                T acc = 0;
                for (int64_t j = 0; j < Kg; ++j) acc += wr[c * Kg + j] * dyp[c * Kg + j];
                dxp[c] += acc;
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
bool direct_grad_weight_nchw(const ConvShape& s, const T* dy, const T* x, T* dw, T* db) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx2_nchw(s)) {
      grad_weight_nchw_avx2(s, dy, x, dw, db);
      return db != nullptr;
    }
  }
  const int64_t PQ = s.PQ(), HW = s.HW(), RS = s.RS();
  at::parallel_for(0, s.K * RS, plane_grain(s.N * PQ), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i / RS, r = (i % RS) / s.S, q = i % s.S, c = k / s.Kg;
      const int64_t off = q * s.dW - s.pW;
      int64_t lo, hi;
      valid_range(off, s.sW, s.W, s.Q, lo, hi);
      double total = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        const T* dyk = dy + (n * s.K + k) * PQ;
        const T* xc = x + (n * s.C + c) * HW;
        for (int64_t oh = 0; oh < s.P; ++oh) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          const T* dyr = dyk + oh * s.Q;
          const T* xr = xc + ih * s.W + off;
          T acc = 0;
          if (s.sW == 1) {
#pragma omp simd reduction(+ : acc)
            for (int64_t ow = lo; ow < hi; ++ow) acc += dyr[ow] * xr[ow];
          } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t ow = lo; ow < hi; ++ow) acc += dyr[ow] * xr[ow * s.sW];
          }
          total += acc;
        }
      }
      dw[i] = T(total);
    }
  });
  return false;
}

template <typename T>
void direct_grad_weight_nhwc(const ConvShape& s, const T* dy, const T* x, T* dw) {
  const int64_t K = s.K, C = s.C, Kg = s.Kg, RS = s.RS(), rows = s.N * s.P;
  const int64_t nchunks = planned_chunks(rows);
  std::vector<double> partial(nchunks * RS * K, 0.0);  // [chunk][r, s][k]
  run_chunks(rows, [&](int64_t chunk, int64_t i0, int64_t i1) {
    double* acc = partial.data() + chunk * RS * K;
    std::vector<T> row(RS * K);  // one output row's sums, in T, then into double
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.P, oh = i % s.P;
      std::fill(row.begin(), row.end(), T(0));
      for (int64_t ow = 0; ow < s.Q; ++ow) {
        const T* __restrict__ dyp = dy + (i * s.Q + ow) * K;
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t iw = ow * s.sW - s.pW + q * s.dW;
            if (iw < 0 || iw >= s.W) continue;
            const T* __restrict__ xp = x + ((n * s.H + ih) * s.W + iw) * C;
            T* __restrict__ ra = row.data() + (r * s.S + q) * K;
            if (Kg == 1) {
              for (int64_t k = 0; k < K; ++k) ra[k] += dyp[k] * xp[k];
            } else {
              for (int64_t c = 0; c < C; ++c)
                for (int64_t j = 0; j < Kg; ++j) ra[c * Kg + j] += dyp[c * Kg + j] * xp[c];
            }
          }
        }
      }
      for (int64_t j = 0; j < RS * K; ++j) acc[j] += double(row[j]);
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < RS; ++j) {
      double total = 0;
      for (int64_t c = 0; c < nchunks; ++c) total += partial[(c * RS + j) * K + k];
      dw[k * RS + j] = T(total);
    }
  }
}

#define FASTLAYERS_DIRECT_INSTANTIATE(T)                                                   \
  template void direct_forward_nchw<T>(const ConvShape&, const T*, const T*, const T*, T*); \
  template void direct_forward_nhwc<T>(const ConvShape&, const T*, const T*, const T*, T*); \
  template void direct_grad_input_nchw<T>(const ConvShape&, const T*, const T*, T*);        \
  template void direct_grad_input_nhwc<T>(const ConvShape&, const T*, const T*, T*);        \
  template bool direct_grad_weight_nchw<T>(const ConvShape&, const T*, const T*, T*, T*);   \
  template void direct_grad_weight_nhwc<T>(const ConvShape&, const T*, const T*, T*);
FASTLAYERS_DIRECT_INSTANTIATE(float)
FASTLAYERS_DIRECT_INSTANTIATE(double)
#undef FASTLAYERS_DIRECT_INSTANTIATE

}  // namespace fastlayers::cpu
