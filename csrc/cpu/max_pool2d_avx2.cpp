// MaxPool2d forward, AVX2 path (8 float lanes). Algorithm: max_pool2d_kernels.h.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "max_pool2d_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define FL_POOL_SIMD_IMPL pool_avx2
#include "max_pool2d_simd.h"

namespace fastlayers::cpu {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  using V = __m256;
  using I = __m256i;
  using M = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_n(const float* p, int64_t n) {  // lanes >= n read as 0, not touched
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, m);
  }
  static V load_s2(const float* p) {  // p[0], p[2], ..., p[14]
    __m256 t = _mm256_shuffle_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8), _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static void load_s2_pair(const float* p, V& ev, V& od) {  // p[2j] and p[2j + 1]
    const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
    od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static I lane_mul(int32_t s) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(s));
  }
  static V gather(const float* p, I lanes) { return _mm256_i32gather_ps(p, lanes, 4); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static I seti(int32_t x) { return _mm256_set1_epi32(x); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static M upd(V v, V m) {
    return _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  static V blend(V a, V b, M u) { return _mm256_blendv_ps(a, b, u); }
  static I blendi(I a, I b, M u) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), u));
  }
  // Running max step, torch's rule: (m, idx) take (v, vi) where v > m or v is NaN.
  static void take(V v, I vi, V& m, I& idx) {
    const M u = upd(v, m);
    m = blend(m, v, u);
    idx = blendi(idx, vi, u);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_i32(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static void store_u8(uint8_t* p, I v) {
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  }
};

}  // namespace

void max_pool2d_rows_avx2(const PoolRowsArgs& a) { pool_avx2::pool_rows_any<Avx2>(a); }

// Backward of the 2x2 / stride 2 window, one output row: input rows x0, x1
// get dy where the offset names them, else 0 (8 outputs -> 2 x 16 inputs).
void max_pool2d_bwd_k2s2_row_avx2(const float* dy, const uint8_t* o, int64_t OW, float* x0,
                                  float* x1) {
  // 8 outputs: d[8] and t[8] -> r0[16], r1[16] (interleaved selects).
  auto block = [](const float* d, const uint8_t* t8, float* r0, float* r1) {
    const __m256 v = _mm256_loadu_ps(d);
    const __m256i t = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(t8)));
    auto sel = [&](int k) {
      return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(t, _mm256_set1_epi32(k))));
    };
    const __m256 b0 = sel(0), b1 = sel(1), b2 = sel(2), b3 = sel(3);
    const __m256 l0 = _mm256_unpacklo_ps(b0, b1), h0 = _mm256_unpackhi_ps(b0, b1);
    const __m256 l1 = _mm256_unpacklo_ps(b2, b3), h1 = _mm256_unpackhi_ps(b2, b3);
    _mm256_storeu_ps(r0, _mm256_permute2f128_ps(l0, h0, 0x20));
    _mm256_storeu_ps(r0 + 8, _mm256_permute2f128_ps(l0, h0, 0x31));
    _mm256_storeu_ps(r1, _mm256_permute2f128_ps(l1, h1, 0x20));
    _mm256_storeu_ps(r1 + 8, _mm256_permute2f128_ps(l1, h1, 0x31));
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(dy + ow, o + ow, x0 + 2 * ow, x1 + 2 * ow);
  if (ow < OW && OW >= 8) {
    // Tail: the last 8 outputs again, overlapping; rewriting an input
    // element writes the same value, so this is exact.
    ow = OW - 8;
    block(dy + ow, o + ow, x0 + 2 * ow, x1 + 2 * ow);
    return;
  }
  for (; ow < OW; ++ow) {
    const float v = dy[ow];
    const uint8_t t = o[ow];
    x0[2 * ow] = t == 0 ? v : 0.f;
    x0[2 * ow + 1] = t == 1 ? v : 0.f;
    x1[2 * ow] = t == 2 ? v : 0.f;
    x1[2 * ow + 1] = t == 3 ? v : 0.f;
  }
}

void max_pool2d_pixel_avx2(const PoolPixelArgs& a) { pool_avx2::pool_pixel<Avx2>(a); }

// Forward of the 2x2 / stride 2 window straight from input rows r0, r1 (no
// band buffer), one output row, OW >= 8: taps in torch's order (r0 even,
// r0 odd, r1 even, r1 odd), first max wins, NaN wins.
void max_pool2d_fwd_k2s2_row_avx2(const float* r0, const float* r1, int64_t OW, float* out,
                                  uint8_t* off) {
  auto block = [&](int64_t ow) {
    __m256 a, b, c, d;
    Avx2::load_s2_pair(r0 + 2 * ow, a, b);
    Avx2::load_s2_pair(r1 + 2 * ow, c, d);
    __m256 m = a;
    __m256i idx = _mm256_setzero_si256();
    Avx2::take(b, _mm256_set1_epi32(1), m, idx);
    Avx2::take(c, _mm256_set1_epi32(2), m, idx);
    Avx2::take(d, _mm256_set1_epi32(3), m, idx);
    _mm256_storeu_ps(out + ow, m);
    Avx2::store_u8(off + ow, idx);
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow);
  if (ow < OW) block(OW - 8);  // overlapping tail: recomputes the same values
}

// Columns c0 .. c0 + 16 of a row into pad, -inf outside [0, W) (the rare
// block at the right edge); kept out of line and scalar.
__attribute__((noinline)) const float* k3s2_pad_row(const float* row, int64_t c0, int64_t W,
                                                    float* pad) {
  for (int64_t j = 0; j < 17; ++j) {
    const int64_t c = c0 + j;
    pad[j] = c >= 0 && c < W ? row[c] : -__builtin_inff();
    __asm__("" ::: "memory");  // keep it a plain loop
  }
  return pad;
}

// Forward of a 3-wide window with column stride 2 (dilation 1), in two
// passes. Horizontal, once per input row: for each output column ow, the max
// of input columns 2 * ow - pW + kw (kw = 0, 1, 2; left padding skipped) and
// its kw. Per 8 outputs, one deinterleaving load gives the taps kw = 1, 2
// (columns c0 + 1 .. c0 + 16) and tap 0 is tap 2 shifted by one lane, with
// column c0 (or -inf left of the input) in lane 0. A block whose last column
// is past the input (right padding, ceil_mode) reads a -inf padded copy.
// Vertical, once per output row: the rows' results merged in window-row
// order. Max rule as torch (first max wins, the last NaN wins); it is
// associative, so the row-then-column order gives torch's result, and an
// input row shared by two windows (stride 2 < 3 rows) is reduced once.
// OW >= 8 (blocks of 8 outputs; the last one overlaps and recomputes).
void max_pool2d_k3s2_hrow_avx2(const float* row, int64_t W, int64_t pW, int64_t OW, float* hm,
                               int32_t* hi) {
  const __m256i lane2 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i up1 = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2);
  auto block = [&](int64_t ow) {
    const int64_t c0 = 2 * ow - pW;
    // kw of the first in-input tap: max(0, -(c0 + 2j)); in a lane whose tap
    // 0 is left padding (-inf) that is tap 1, as torch.
    const __m256i cj = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c0)), lane2);
    const __m256i kw0 =
        _mm256_max_epi32(_mm256_setzero_si256(), _mm256_sub_epi32(_mm256_setzero_si256(), cj));
    alignas(32) float pad[17];
    const bool right = c0 + 17 > W;  // column c0 + 16 is past the input
    const bool left = c0 < 0;
    const float* p = row + c0;  // column c0 (read only when inside)
    if (__builtin_expect(right, 0)) p = k3s2_pad_row(row, c0, W, pad);
    __m256 t1, t2;
    Avx2::load_s2_pair(p + 1, t1, t2);
    const __m256 first = !left || right ? _mm256_broadcast_ss(p) : ninf;
    __m256 m = _mm256_blend_ps(_mm256_permutevar8x32_ps(t2, up1), first, 1);
    __m256i idx = kw0;
    Avx2::take(t1, one, m, idx);
    Avx2::take(t2, two, m, idx);
    _mm256_storeu_ps(hm + ow, m);
    Avx2::store_i32(hi + ow, idx);
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow);
  if (ow < OW) block(OW - 8);  // overlapping tail: recomputes the same values
}

// The vertical pass: nrows (>= 1) horizontal results hm[i], hi[i] of window
// rows kh[i] (in order) -> output row and uint8 offsets kh * 3 + kw.
void max_pool2d_k3s2_vmerge_avx2(const float* const* hm, const int32_t* const* hi,
                                 const int32_t* kh, int64_t nrows, int64_t OW, float* out,
                                 uint8_t* off) {
  auto block = [&](int64_t ow) {
    __m256 m = _mm256_loadu_ps(hm[0] + ow);
    __m256i idx = _mm256_add_epi32(Avx2::loadi(hi[0] + ow), _mm256_set1_epi32(kh[0] * 3));
    for (int64_t i = 1; i < nrows; ++i) {
      const __m256 v = _mm256_loadu_ps(hm[i] + ow);
      const __m256i vi = _mm256_add_epi32(Avx2::loadi(hi[i] + ow), _mm256_set1_epi32(kh[i] * 3));
      Avx2::take(v, vi, m, idx);
    }
    _mm256_storeu_ps(out + ow, m);
    Avx2::store_u8(off + ow, idx);
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow);
  if (ow < OW) block(OW - 8);
}

}  // namespace fastlayers::cpu

#pragma GCC pop_options
