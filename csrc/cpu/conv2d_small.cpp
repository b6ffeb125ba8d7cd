// Direct "flat" Conv2d kernels for small NCHW float problems with Cg > 1 and
// stride 1 (LeNet's conv2: 6 -> 16 channels, 5x5, 14x14 -> 10x10), where the
// general im2col + GEMM path spends more time packing than computing.
//
// Each input channel is copied into a zero-padded plane of pitch Wp = W + 2pW,
// stored flat. With output pixel (oh, ow) at flat index t = oh*Wp + ow (ow < Wp;
// the columns ow >= Q are computed and dropped), every filter tap (r, q) is a
// constant shift d = r*dH*Wp + q*dW, so a conv is a sum of shifted vectors:
//   forward      y[k][t]        = b[k] + sum_{c,r,q} w[k,c,r,q] * x[c][t + d]
//   grad_weight  dw[k,c,r,q]   += sum_t dyW[k][t] * x[c][t + d]
//   grad_input   dx[c][t + d]  += sum_k w[k,c,r,q] * dyW[k][t]
// where dyW is dY widened to pitch Wp with zero columns (so no tap wraps into
// the next row). grad_input runs as a gather per filter row r: a block of dx
// vectors sums its S taps q and Kg channels k in registers before one add
// into the planes (Flat::gm). The loops keep up to 12 ymm accumulators in
// registers. With Kg = 8 or 16 the forward and grad_weight put the output
// channels in the lanes instead (no lanes spent on the dropped columns).
// grad_weight sums images in fixed blocks (in double), independent of the
// thread count. AVX2 only; callers check small_conv_ok() and active_isa().
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "conv2d.h"
#include "gemm_kernels.h"

namespace fastlayers::cpu {
namespace {

int64_t rnd8(int64_t v) { return (v + 7) / 8 * 8; }

// Flat geometry shared by the three passes.
struct Flat {
  int64_t Wp, T, L;  // pitch, computed outputs (multiple of 8), padded plane length
  std::vector<int64_t> d;  // tap shifts, r*S + q
  // Taps j = (r*S + q)*Cg + c: weight offset c*RS + r*S + q and padded-plane
  // offset c*L + d[r*S + q] (tables: no divisions in the loops); grad_input
  // and the channels-in-lanes forward walk them in this order.
  std::vector<int64_t> gi_x;
  // grad_input as a gather per filter row r: dx[c][r*dH*Wp + u] += sum over q,
  // k of w[k,c,r,q] * dyW[k][u - q*dW] for u < 8*gnv, with dyW given a front
  // margin of gm zeros (pitch gTp per k) and the dx planes pitch gLp.
  int64_t gm, gnv, gTp, gLp;
  explicit Flat(const ConvShape& s) {
    Wp = s.W + 2 * s.pW;
    T = rnd8((s.P - 1) * Wp + s.Q);  // through the last valid output
    L = T + (s.R - 1) * s.dH * Wp + (s.S - 1) * s.dW;
    d.resize(s.RS());
    for (int64_t r = 0; r < s.R; ++r)
      for (int64_t q = 0; q < s.S; ++q) d[r * s.S + q] = r * s.dH * Wp + q * s.dW;
    gm = (s.S - 1) * s.dW;
    gnv = (T + gm + 7) / 8;
    gTp = gm + 8 * gnv;
    gLp = (s.R - 1) * s.dH * Wp + 8 * gnv;
    for (int64_t j = 0; j < s.CgRS(); ++j) {
      gi_x.push_back((j % s.Cg) * L + d[j / s.Cg]);
    }
  }
};

// x plane [H, W] -> buf [L], padded; zero elsewhere.
void pad_in(const ConvShape& s, const Flat& f, const float* x, float* buf) {
  std::fill(buf, buf + f.L, 0.f);
  for (int64_t h = 0; h < s.H; ++h)
    std::copy(x + h * s.W, x + (h + 1) * s.W, buf + (h + s.pH) * f.Wp + s.pW);
}

// dy plane [P, Q] -> buf [T] with pitch Wp, zero elsewhere.
void widen_dy(const ConvShape& s, const Flat& f, const float* dy, float* buf) {
  std::fill(buf, buf + f.T, 0.f);
  for (int64_t h = 0; h < s.P; ++h) std::copy(dy + h * s.Q, dy + (h + 1) * s.Q, buf + h * f.Wp);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")

// For gin_block's loops over template bounds: unrolled, its accumulators
// stay in registers (gcc otherwise keeps the acc array on the stack at the
// block's start and end: 24 stores and 12 reloads per block of 16 k steps).
// fwd_block and wgt_block, with long k loops, measured 3-10 % slower so.
#define FL_UNROLL _Pragma("GCC unroll 16")

inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// db[k] += the sum of row k of a [rows][n] matrix.
void db_add_rows(int64_t rows, int64_t n, const float* a, double* db) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* r = a + k * n;
    __m256 v = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= n; p += 8) v = _mm256_add_ps(v, _mm256_loadu_ps(r + p));
    float t = hsum8(v);
    for (; p < n; ++p) t += r[p];
    db[k] += t;
  }
}

// Forward block: KB output channels (weights wk, row stride CgRS) x TB
// vectors of t starting at t0; xb = Cg padded planes of length L.
template <int KB, int TB>
void fwd_block(const ConvShape& s, const Flat& f, const float* xb, const float* wk,
               const float* bias, int64_t t0, float* yb) {
  const int64_t RS = s.RS(), CgRS = s.CgRS();
  __m256 acc[KB][TB];
  for (int i = 0; i < KB; ++i)
    for (int v = 0; v < TB; ++v) acc[i][v] = _mm256_set1_ps(bias ? bias[i] : 0.f);
  for (int64_t c = 0; c < s.Cg; ++c) {
    const float* xc = xb + c * f.L + t0;
    for (int64_t j = 0; j < RS; ++j) {
      const float* p = xc + f.d[j];
      __m256 xv[TB];
      for (int v = 0; v < TB; ++v) xv[v] = _mm256_loadu_ps(p + 8 * v);
      for (int i = 0; i < KB; ++i) {
        const __m256 wv = _mm256_set1_ps(wk[i * CgRS + c * RS + j]);
        for (int v = 0; v < TB; ++v) acc[i][v] = _mm256_fmadd_ps(wv, xv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int v = 0; v < TB; ++v) _mm256_storeu_ps(yb + i * f.T + t0 + 8 * v, acc[i][v]);
}

// grad_weight block: KB output channels x TB taps (j0 .. j0+TB-1 of channel c),
// summed over nb images (xb, dyb: per image Cg planes of L, Kg planes of T).
template <int KB, int TB>
void wgt_block(const ConvShape& s, const Flat& f, const float* xb, const float* dyb, int64_t nb,
               int64_t k0, int64_t c, int64_t j0, double* dw /* [Kg][CgRS] */) {
  __m256 acc[KB][TB];
  for (int i = 0; i < KB; ++i)
    for (int v = 0; v < TB; ++v) acc[i][v] = _mm256_setzero_ps();
  const int64_t img = s.Cg * f.L + s.Kg * f.T;
  for (int64_t n = 0; n < nb; ++n) {
    const float* xc = xb + n * img + c * f.L;
    const float* dk = dyb + n * img + k0 * f.T;
    for (int64_t t = 0; t < f.T; t += 8) {
      __m256 xv[TB];
      for (int v = 0; v < TB; ++v) xv[v] = _mm256_loadu_ps(xc + t + f.d[j0 + v]);
      for (int i = 0; i < KB; ++i) {
        const __m256 dv = _mm256_loadu_ps(dk + i * f.T + t);
        for (int v = 0; v < TB; ++v) acc[i][v] = _mm256_fmadd_ps(dv, xv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < KB; ++i)
    for (int v = 0; v < TB; ++v) dw[(k0 + i) * s.CgRS() + c * s.RS() + j0 + v] += hsum8(acc[i][v]);
}

// grad_input block: KB channels c0.. x TB vectors u0.. of filter row r
// (see Flat::gm): sums over the S taps q and the Kg channels k in registers,
// then adds once into the dx planes. wg is the group's filters as
// [r][q][k][c], so a step's KB weights are adjacent.
template <int KB, int TB>
void gin_block(const ConvShape& s, const Flat& f, const float* dyb, const float* wg, int64_t r,
               int64_t c0, int64_t u0, float* dxb) {
  const int64_t Cg = s.Cg, Kg = s.Kg, Tp = f.gTp;
  __m256 acc[KB][TB];
  FL_UNROLL for (int i = 0; i < KB; ++i)
    FL_UNROLL for (int v = 0; v < TB; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t q = 0; q < s.S; ++q) {
    const float* dq = dyb + f.gm - q * s.dW + u0;
    const float* wq = wg + (r * s.S + q) * Kg * Cg + c0;
    for (int64_t k = 0; k < Kg; ++k) {
      __m256 dv[TB];
      FL_UNROLL for (int v = 0; v < TB; ++v) dv[v] = _mm256_loadu_ps(dq + k * Tp + 8 * v);
      FL_UNROLL for (int i = 0; i < KB; ++i) {
        const __m256 wv = _mm256_set1_ps(wq[k * Cg + i]);
        FL_UNROLL for (int v = 0; v < TB; ++v) acc[i][v] = _mm256_fmadd_ps(wv, dv[v], acc[i][v]);
      }
    }
  }
  FL_UNROLL for (int i = 0; i < KB; ++i) {
    float* p = dxb + (c0 + i) * f.gLp + r * s.dH * f.Wp + u0;
    FL_UNROLL for (int v = 0; v < TB; ++v)
      _mm256_storeu_ps(p + 8 * v, _mm256_add_ps(_mm256_loadu_ps(p + 8 * v), acc[i][v]));
  }
}

template <int KB, int TB>
inline void gin_tb(int64_t tb, const ConvShape& s, const Flat& f, const float* dyb,
                   const float* wg, int64_t r, int64_t c0, int64_t u0, float* dxb) {
  if constexpr (TB > 1) {
    if (tb < TB) return gin_tb<KB, TB - 1>(tb, s, f, dyb, wg, r, c0, u0, dxb);
  }
  gin_block<KB, TB>(s, f, dyb, wg, r, c0, u0, dxb);
}

// Channel blocks of at most 6 (near-equal), each with 12 / KB (at most 4)
// vectors at a time: 12 accumulators or fewer.
template <int KB>
void gin_row(const ConvShape& s, const Flat& f, const float* dyb, const float* wg, int64_t r,
             int64_t c0, float* dxb) {
  constexpr int TB = std::min(4, 12 / KB);
  for (int64_t v0 = 0; v0 < f.gnv; v0 += TB)
    gin_tb<KB, TB>(std::min<int64_t>(TB, f.gnv - v0), s, f, dyb, wg, r, c0, 8 * v0, dxb);
}

// Forward with output channels in the vector lanes (Kg = 8 or 16: no lanes
// wasted on the dropped columns): xb is the image's Cg padded planes (as
// pad_in makes them), wt the filters as [r, q, c][Kg]; PB pixels ow0 .. of
// row oh, stored channels-last into yt [P*Q][Kg].
template <int KV, int PB>
void fwd_cl_block(const ConvShape& s, const Flat& f, const float* xb, const float* wt,
                  const float* bias, int64_t oh, int64_t ow0, float* yt) {
  const int64_t Kg = s.Kg;
  __m256 acc[PB][KV];
  for (int v = 0; v < KV; ++v) {
    const __m256 bv = bias ? _mm256_loadu_ps(bias + 8 * v) : _mm256_setzero_ps();
    for (int p = 0; p < PB; ++p) acc[p][v] = bv;
  }
  // One loop over the taps (r, q, c): weights in order, inputs by table.
  const float* xo = xb + oh * f.Wp + ow0;
  const int64_t* xj = f.gi_x.data();
  for (int64_t j = 0, n = s.CgRS(); j < n; ++j) {
    const float* xp = xo + xj[j];
    const float* wp = wt + j * Kg;
    __m256 wv[KV];
    for (int v = 0; v < KV; ++v) wv[v] = _mm256_loadu_ps(wp + 8 * v);
    for (int p = 0; p < PB; ++p) {
      const __m256 xv = _mm256_set1_ps(xp[p]);
      for (int v = 0; v < KV; ++v) acc[p][v] = _mm256_fmadd_ps(xv, wv[v], acc[p][v]);
    }
  }
  float* yp = yt + (oh * s.Q + ow0) * Kg;
  for (int p = 0; p < PB; ++p)
    for (int v = 0; v < KV; ++v) _mm256_storeu_ps(yp + p * Kg + 8 * v, acc[p][v]);
}

// Row oh in ceil(Q / 6) near-equal pixel blocks (Q = 10: 5 + 5, not 6 + 4).
template <int KV>
void fwd_cl_row(const ConvShape& s, const Flat& f, const float* xb, const float* wt,
                const float* bias, int64_t oh, float* yt) {
  const int64_t nb = (s.Q + 5) / 6;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t ow = i * s.Q / nb, pb = (i + 1) * s.Q / nb - ow;
    switch (pb) {
      case 1: fwd_cl_block<KV, 1>(s, f, xb, wt, bias, oh, ow, yt); break;
      case 2: fwd_cl_block<KV, 2>(s, f, xb, wt, bias, oh, ow, yt); break;
      case 3: fwd_cl_block<KV, 3>(s, f, xb, wt, bias, oh, ow, yt); break;
      case 4: fwd_cl_block<KV, 4>(s, f, xb, wt, bias, oh, ow, yt); break;
      case 5: fwd_cl_block<KV, 5>(s, f, xb, wt, bias, oh, ow, yt); break;
      default: fwd_cl_block<KV, 6>(s, f, xb, wt, bias, oh, ow, yt); break;
    }
  }
}

// Runs fn.template operator()<KB, TB>(i0, v0) over an ni x nv grid (ni rows
// in blocks of 4, nv vectors in blocks of 3), remainders with smaller blocks.
template <int KB, typename F>
inline void tb_switch(int64_t tb, const F& fn, int64_t i0, int64_t v0) {
  if (tb == 3) fn.template operator()<KB, 3>(i0, v0);
  else if (tb == 2) fn.template operator()<KB, 2>(i0, v0);
  else fn.template operator()<KB, 1>(i0, v0);
}
template <typename F>
inline void grid(int64_t ni, int64_t nv, const F& fn) {
  for (int64_t i0 = 0; i0 < ni; i0 += 4) {
    const int64_t kb = std::min<int64_t>(4, ni - i0);
    for (int64_t v0 = 0; v0 < nv; v0 += 3) {
      const int64_t tb = std::min<int64_t>(3, nv - v0);
      switch (kb) {
        case 4: tb_switch<4>(tb, fn, i0, v0); break;
        case 3: tb_switch<3>(tb, fn, i0, v0); break;
        case 2: tb_switch<2>(tb, fn, i0, v0); break;
        default: tb_switch<1>(tb, fn, i0, v0); break;
      }
    }
  }
}

bool use_cl_forward(const ConvShape& s) { return s.Kg == 8 || s.Kg == 16; }

// xb: Cg*L floats, yb: Kg*T; wt: [r, q, c][Kg].
void forward_image(const ConvShape& s, const Flat& f, const float* x, const float* w,
                   const float* wt, const float* b, float* y, float* xb, float* yb) {
  for (int64_t c = 0; c < s.Cg; ++c) pad_in(s, f, x + c * s.HW(), xb + c * f.L);
  if (use_cl_forward(s)) {
    for (int64_t oh = 0; oh < s.P; ++oh) {
      if (s.Kg == 16) fwd_cl_row<2>(s, f, xb, wt, b, oh, yb);
      else fwd_cl_row<1>(s, f, xb, wt, b, oh, yb);
    }
    // yb [P*Q][Kg] -> y [Kg][P*Q]
    return gemm_detail::transpose_f32_avx2(s.PQ(), s.Kg, yb, s.Kg, y, s.PQ());
  }
  grid(s.Kg, f.T / 8, [&]<int KB, int TB>(int64_t k0, int64_t v0) {
    fwd_block<KB, TB>(s, f, xb, w + k0 * s.CgRS(), b ? b + k0 : nullptr, 8 * v0, yb + k0 * f.T);
  });
  for (int64_t k = 0; k < s.Kg; ++k)
    for (int64_t h = 0; h < s.P; ++h)
      std::copy(yb + k * f.T + h * f.Wp, yb + k * f.T + h * f.Wp + s.Q, y + (k * s.P + h) * s.Q);
}

// dyb: Kg * gTp floats, dxb: Cg * gLp; wg: the group's filters [r][q][k][c].
void grad_input_image(const ConvShape& s, const Flat& f, const float* dy, const float* wg,
                      float* dx, float* dyb, float* dxb) {
  std::fill(dyb, dyb + s.Kg * f.gTp, 0.f);
  for (int64_t k = 0; k < s.Kg; ++k)
    for (int64_t h = 0; h < s.P; ++h)
      std::copy(dy + (k * s.P + h) * s.Q, dy + (k * s.P + h + 1) * s.Q,
                dyb + k * f.gTp + f.gm + h * f.Wp);
  std::fill(dxb, dxb + s.Cg * f.gLp, 0.f);
  const int64_t nc = (s.Cg + 5) / 6;  // channel blocks
  for (int64_t r = 0; r < s.R; ++r)
    for (int64_t i = 0; i < nc; ++i) {
      const int64_t c0 = i * s.Cg / nc;
      switch ((i + 1) * s.Cg / nc - c0) {
        case 1: gin_row<1>(s, f, dyb, wg, r, c0, dxb); break;
        case 2: gin_row<2>(s, f, dyb, wg, r, c0, dxb); break;
        case 3: gin_row<3>(s, f, dyb, wg, r, c0, dxb); break;
        case 4: gin_row<4>(s, f, dyb, wg, r, c0, dxb); break;
        case 5: gin_row<5>(s, f, dyb, wg, r, c0, dxb); break;
        default: gin_row<6>(s, f, dyb, wg, r, c0, dxb); break;
      }
    }
  for (int64_t c = 0; c < s.Cg; ++c)
    for (int64_t h = 0; h < s.H; ++h) {
      const float* src = dxb + c * f.gLp + (h + s.pH) * f.Wp + s.pW;
      std::copy(src, src + s.W, dx + (c * s.H + h) * s.W);
    }
}

// Adds images' grad_weight (and grad_bias when db) of one group into dw, db.
void grad_weight_images(const ConvShape& s, const Flat& f, const float* dy, const float* x,
                        int64_t nb, int64_t g, double* dw, double* db, float* buf) {
  const int64_t img = s.Cg * f.L + s.Kg * f.T;
  for (int64_t n = 0; n < nb; ++n) {
    float* xb = buf + n * img;
    float* dyb = xb + s.Cg * f.L;
    const float* xn = x + (n * s.C + g * s.Cg) * s.HW();
    const float* dyn = dy + (n * s.K + g * s.Kg) * s.PQ();
    for (int64_t c = 0; c < s.Cg; ++c) pad_in(s, f, xn + c * s.HW(), xb + c * f.L);
    for (int64_t k = 0; k < s.Kg; ++k) {
      widen_dy(s, f, dyn + k * s.PQ(), dyb + k * f.T);
      if (db) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t t = 0; t < f.T; t += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(dyb + k * f.T + t));
        db[k] += hsum8(a);
      }
    }
  }
  for (int64_t c = 0; c < s.Cg; ++c) {
    grid(s.Kg, s.RS(), [&]<int KB, int TB>(int64_t k0, int64_t j0) {
      wgt_block<KB, TB>(s, f, buf, buf + s.Cg * f.L, nb, k0, c, j0, dw);
    });
  }
}

// grad_weight with output channels in the lanes (Kg = 8 or 16, as forward):
//   dw[k, c, r, q] += sum over images, pixels of dyT[pix][k] * x[c][pix + tap]
// for up to 6 channels c of one tap (r, q) at a time; no horizontal sums.
// Per image in buf: the Cg padded planes (pad_in), then dyT [P*Q][Kg].
template <int KV, int CB>
void wgt_cl_block(const ConvShape& s, const Flat& f, const float* buf, int64_t img, int64_t nb,
                  int64_t r, int64_t q, int64_t c0, double* dw) {
  const int64_t Kg = s.Kg, L = f.L;
  __m256 acc[CB][KV];
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < KV; ++v) acc[c][v] = _mm256_setzero_ps();
  for (int64_t n = 0; n < nb; ++n) {
    const float* xt = buf + n * img;
    const float* dyt = xt + s.Cg * L;
    for (int64_t oh = 0; oh < s.P; ++oh) {
      const float* xp = xt + c0 * L + (oh + r * s.dH) * f.Wp + q * s.dW;
      const float* dp = dyt + oh * s.Q * Kg;
      for (int64_t ow = 0; ow < s.Q; ++ow) {
        __m256 dv[KV];
        for (int v = 0; v < KV; ++v) dv[v] = _mm256_loadu_ps(dp + ow * Kg + 8 * v);
        for (int c = 0; c < CB; ++c) {
          const __m256 xb = _mm256_set1_ps(xp[c * L + ow]);
          for (int v = 0; v < KV; ++v) acc[c][v] = _mm256_fmadd_ps(xb, dv[v], acc[c][v]);
        }
      }
    }
  }
  for (int c = 0; c < CB; ++c) {
    alignas(32) float lanes[KV * 8];
    for (int v = 0; v < KV; ++v) _mm256_store_ps(lanes + 8 * v, acc[c][v]);
    for (int64_t k = 0; k < Kg; ++k) dw[k * s.CgRS() + (c0 + c) * s.RS() + r * s.S + q] += lanes[k];
  }
}

template <int KV>
void wgt_cl_taps(const ConvShape& s, const Flat& f, const float* buf, int64_t img, int64_t nb,
                 double* dw) {
  for (int64_t r = 0; r < s.R; ++r)
    for (int64_t q = 0; q < s.S; ++q)
      for (int64_t c0 = 0; c0 < s.Cg; c0 += 6) {
        switch (std::min<int64_t>(6, s.Cg - c0)) {
          case 1: wgt_cl_block<KV, 1>(s, f, buf, img, nb, r, q, c0, dw); break;
          case 2: wgt_cl_block<KV, 2>(s, f, buf, img, nb, r, q, c0, dw); break;
          case 3: wgt_cl_block<KV, 3>(s, f, buf, img, nb, r, q, c0, dw); break;
          case 4: wgt_cl_block<KV, 4>(s, f, buf, img, nb, r, q, c0, dw); break;
          case 5: wgt_cl_block<KV, 5>(s, f, buf, img, nb, r, q, c0, dw); break;
          default: wgt_cl_block<KV, 6>(s, f, buf, img, nb, r, q, c0, dw); break;
        }
      }
}

#pragma GCC pop_options

// Per-image buffer length of grad_weight_images.
int64_t gw_img_len(const ConvShape& s, const Flat& f) {
  return s.Cg * f.L + (use_cl_forward(s) ? s.PQ() : f.T) * s.Kg;
}

void grad_weight_images_cl(const ConvShape& s, const Flat& f, const float* dy, const float* x,
                           int64_t nb, int64_t g, double* dw, double* db, float* buf) {
  const int64_t img = gw_img_len(s, f), PQ = s.PQ();
  for (int64_t n = 0; n < nb; ++n) {
    float* xt = buf + n * img;
    float* dyt = xt + s.Cg * f.L;
    const float* dyn = dy + (n * s.K + g * s.Kg) * PQ;
    const float* xn = x + (n * s.C + g * s.Cg) * s.HW();
    for (int64_t c = 0; c < s.Cg; ++c) pad_in(s, f, xn + c * s.HW(), xt + c * f.L);
    gemm_detail::transpose_f32_avx2(s.Kg, PQ, dyn, PQ, dyt, s.Kg);
    if (db) db_add_rows(s.Kg, PQ, dyn, db);
  }
  if (s.Kg == 16) wgt_cl_taps<2>(s, f, buf, img, nb, dw);
  else wgt_cl_taps<1>(s, f, buf, img, nb, dw);
}

}  // namespace

bool small_conv_ok(const ConvShape& s, int64_t budget) {
  if (s.sH != 1 || s.sW != 1 || s.Cg < 2 || s.Kg > 32) return false;
  const Flat f(s);
  // One image's padded planes and outputs within the budget (L2 sized).
  const int64_t per_image = std::max(s.Cg * f.L + s.Kg * f.T, s.Cg * f.gLp + s.Kg * f.gTp);
  return per_image * 4 <= budget && s.CgRS() <= 1024;
}

void small_forward_nchw(const ConvShape& s, const float* x, const float* w, const float* b,
                        float* y) {
  const Flat f(s);
  const int64_t RS = s.RS(), CgRS = s.CgRS();
  std::vector<float> wt(s.G * s.Kg * CgRS);  // per group [r, q, c][Kg]
  for (int64_t g = 0; g < s.G; ++g)
    for (int64_t k = 0; k < s.Kg; ++k)
      for (int64_t c = 0; c < s.Cg; ++c)
        for (int64_t j = 0; j < RS; ++j)
          wt[g * s.Kg * CgRS + (j * s.Cg + c) * s.Kg + k] = w[(g * s.Kg + k) * CgRS + c * RS + j];
  at::parallel_for(0, s.N * s.G, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> xb(s.Cg * f.L), yb(s.Kg * f.T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.G, g = i % s.G;
      forward_image(s, f, x + (n * s.C + g * s.Cg) * s.HW(), w + g * s.Kg * CgRS,
                    wt.data() + g * s.Kg * CgRS, b ? b + g * s.Kg : nullptr,
                    y + (n * s.K + g * s.Kg) * s.PQ(), xb.data(), yb.data());
    }
  });
}

void small_grad_input_nchw(const ConvShape& s, const float* dy, const float* w, float* dx) {
  const Flat f(s);
  const int64_t RS = s.RS(), CgRS = s.CgRS(), Cg = s.Cg, Kg = s.Kg;
  std::vector<float> wg(s.G * Kg * CgRS);  // per group [r, q][k][c]
  for (int64_t g = 0; g < s.G; ++g)
    for (int64_t k = 0; k < Kg; ++k)
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t j = 0; j < RS; ++j)
          wg[g * Kg * CgRS + (j * Kg + k) * Cg + c] = w[(g * Kg + k) * CgRS + c * RS + j];
  at::parallel_for(0, s.N * s.G, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> dyb(Kg * f.gTp), dxb(Cg * f.gLp);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.G, g = i % s.G;
      grad_input_image(s, f, dy + (n * s.K + g * Kg) * s.PQ(), wg.data() + g * Kg * CgRS,
                       dx + (n * s.C + g * Cg) * s.HW(), dyb.data(), dxb.data());
    }
  });
}

void small_grad_weight_nchw(const ConvShape& s, const float* dy, const float* x, float* dw,
                            float* db) {
  const Flat f(s);
  // Fixed image blocks (not per thread); each sums its images kSub at a time.
  constexpr int64_t kSub = 8;
  const int64_t nblk = std::min<int64_t>(s.N, 8), wl = s.Kg * s.CgRS() + s.Kg;
  const int64_t img = gw_img_len(s, f);
  std::vector<double> part(nblk * s.G * wl, 0.0);  // [block][g][Kg*CgRS | Kg bias]
  at::parallel_for(0, nblk * s.G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t blk = i / s.G, g = i % s.G;
      const int64_t n0 = blk * s.N / nblk, n1 = (blk + 1) * s.N / nblk;
      std::vector<float> buf(std::min<int64_t>(kSub, n1 - n0) * img);
      double* acc = part.data() + i * wl;
      for (int64_t n = n0; n < n1; n += kSub) {
        (use_cl_forward(s) ? grad_weight_images_cl : grad_weight_images)(
            s, f, dy + n * s.K * s.PQ(), x + n * s.C * s.HW(), std::min(kSub, n1 - n), g, acc,
            db ? acc + s.Kg * s.CgRS() : nullptr, buf.data());
      }
    }
  });
  for (int64_t g = 0; g < s.G; ++g)
    for (int64_t j = 0; j < wl; ++j) {
      if (j >= s.Kg * s.CgRS() && !db) break;
      double t = 0;
      for (int64_t blk = 0; blk < nblk; ++blk) t += part[(blk * s.G + g) * wl + j];
      if (j < s.Kg * s.CgRS()) dw[g * s.Kg * s.CgRS() + j] = float(t);
      else db[g * s.Kg + j - s.Kg * s.CgRS()] = float(t);
    }
}

}  // namespace fastlayers::cpu
