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
  // Value-only step, the same rule: max(v, m) keeps m on ties and when m is
  // NaN; a NaN v is taken by the blend.
  static V maxk(V v, V m) {
    return _mm256_blendv_ps(_mm256_max_ps(v, m), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
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

// In-lane deinterleave: the taps of 8 outputs in the lane order kPerm =
// {0, 1, 4, 5, 2, 3, 6, 7} (columns p[0, 2, 8, 10, 4, 6, 12, 14] and the odd
// ones), so no tap needs a lane-crossing shuffle; the kernels keep their
// results in that order and restore the natural one once per output block
// (a 64-bit-pair swap, its own inverse). Lane-crossing shuffles per tap were
// the forward's bottleneck.
inline void cols_s2_perm(const float* p, __m256& ev, __m256& od) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
  od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
}
inline __m256 even_cols(const float* p) {  // p[0, 2, 8, 10, 4, 6, 12, 14]
  return _mm256_shuffle_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8), _MM_SHUFFLE(2, 0, 2, 0));
}
inline __m256 to_natural(__m256 v) {  // kPerm order -> natural order (and back)
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), _MM_SHUFFLE(3, 1, 2, 0)));
}
// Offsets in kPerm order -> 8 bytes in natural order (the reorder is done
// in-lane on the packed 16-bit values).
inline void store_u8_perm(uint8_t* p, __m256i v) {
  __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  w = _mm_shuffle_epi32(w, _MM_SHUFFLE(3, 1, 2, 0));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}

// Forward of the 2x2 / stride 2 window straight from input rows r0, r1 (no
// band buffer), one output row, OW >= 8: taps in torch's order (r0 even,
// r0 odd, r1 even, r1 odd), first max wins, NaN wins.
void max_pool2d_fwd_k2s2_row_avx2(const float* r0, const float* r1, int64_t OW, float* out,
                                  uint8_t* off) {
  auto block = [&](int64_t ow) {
    __m256 a, b, c, d;  // kPerm order
    cols_s2_perm(r0 + 2 * ow, a, b);
    cols_s2_perm(r1 + 2 * ow, c, d);
    __m256 m = a;
    __m256i idx = _mm256_setzero_si256();
    Avx2::take(b, _mm256_set1_epi32(1), m, idx);
    Avx2::take(c, _mm256_set1_epi32(2), m, idx);
    Avx2::take(d, _mm256_set1_epi32(3), m, idx);
    _mm256_storeu_ps(out + ow, to_natural(m));
    store_u8_perm(off + ow, idx);
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow);
  if (ow < OW) block(OW - 8);  // overlapping tail: recomputes the same values
}

// The same without offsets (value-only forward, see max_pool2d_kernels.h).
void max_pool2d_fwd_k2s2_row_max_avx2(const float* r0, const float* r1, int64_t OW, float* out) {
  auto block = [&](int64_t ow) {
    __m256 a, b, c, d;  // kPerm order
    cols_s2_perm(r0 + 2 * ow, a, b);
    cols_s2_perm(r1 + 2 * ow, c, d);
    _mm256_storeu_ps(out + ow, to_natural(Avx2::maxk(d, Avx2::maxk(c, Avx2::maxk(b, a)))));
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow);
  if (ow < OW) block(OW - 8);
}

// Forward of a 3-wide window with column stride 2 (dilation 1), in two
// passes. Horizontal, once per input row: for each output column ow, the max
// of input columns 2 * ow - pW + kw (kw = 0, 1, 2; left padding skipped) and
// its kw. Vertical, once per output row: the rows' results merged in
// window-row order. Max rule as torch (first max wins, the last NaN wins); it
// is associative, so the row-then-column order gives torch's result, and an
// input row shared by two windows (stride 2 < 3 rows) is reduced once.
//
// The taps of 8 outputs come in kPerm lane order (cols_s2_perm: columns
// c0 + {0, 2, 8, 10, 4, 6, 12, 14} + kw); the horizontal results are kept in
// it, the vertical pass (element-wise) keeps it, and restores the natural
// order when it stores. The horizontal results hm, hi of a row
// have ceil(OW / 8) * 8 slots: block b of outputs 8b .. 8b + 7 in slots
// 8b .. 8b + 7, and a last, overlapping block of outputs OW - 8 .. OW - 1 in
// the slots after the whole blocks (in kPerm order the overlap would not
// hold the same values). A block whose columns reach past the
// input (right padding, ceil_mode) reads a -inf padded copy; the block with
// left padding takes tap 0 from tap 2 (one column to the left).
// OW >= 8 (blocks of 8 outputs; the last one overlaps and recomputes).

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

// The three taps of output columns ow .. ow + 7 (column c0 = 2 * ow - pW), in
// kPerm lane order; tap 0 is -inf where it is left padding.
inline void k3s2_taps(const float* row, int64_t W, int64_t c0, __m256& t0, __m256& t1,
                      __m256& t2) {
  alignas(32) float pad[17];
  const float* p = row + c0;  // column c0 (read only when inside)
  const bool right = c0 + 17 > W;  // column c0 + 16 is past the input
  if (__builtin_expect(right, 0)) p = k3s2_pad_row(row, c0, W, pad);
  cols_s2_perm(p + 1, t1, t2);
  if (c0 >= 0 || right) {
    t0 = even_cols(p);
  } else {  // c0 == -1: lane of output j takes tap 2 of output j - 1; lane 0 -inf
    const __m256i from = _mm256_setr_epi32(0, 0, 5, 2, 1, 4, 3, 6);
    t0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(t2, from), _mm256_set1_ps(-__builtin_inff()), 1);
  }
}

void max_pool2d_k3s2_hrow_avx2(const float* row, int64_t W, int64_t pW, int64_t OW, float* hm,
                               int32_t* hi) {
  const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2);
  auto block = [&](int64_t ow, int64_t sl) {
    const int64_t c0 = 2 * ow - pW;
    __m256 m, t1, t2;
    k3s2_taps(row, W, c0, m, t1, t2);
    // kw of the first in-input tap: 1 in the lane whose tap 0 is left
    // padding (output column 0 with pW = 1, lane 0), as torch; else 0.
    __m256i idx = c0 < 0 ? _mm256_setr_epi32(1, 0, 0, 0, 0, 0, 0, 0) : _mm256_setzero_si256();
    Avx2::take(t1, one, m, idx);
    Avx2::take(t2, two, m, idx);
    _mm256_storeu_ps(hm + sl, m);
    Avx2::store_i32(hi + sl, idx);
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow, ow);
  if (ow < OW) block(OW - 8, ow);  // overlapping tail, kept in its own slot
}

void max_pool2d_k3s2_hrow_max_avx2(const float* row, int64_t W, int64_t pW, int64_t OW,
                                   float* hm) {
  auto block = [&](int64_t ow, int64_t sl) {
    __m256 t0, t1, t2;
    k3s2_taps(row, W, 2 * ow - pW, t0, t1, t2);
    _mm256_storeu_ps(hm + sl, Avx2::maxk(t2, Avx2::maxk(t1, t0)));
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow, ow);
  if (ow < OW) block(OW - 8, ow);
}

// The vertical pass: nrows (>= 1) horizontal results hm[i], hi[i] of window
// rows kh[i] (in order) -> output row and uint8 offsets kh * 3 + kw.
void max_pool2d_k3s2_vmerge_avx2(const float* const* hm, const int32_t* const* hi,
                                 const int32_t* kh, int64_t nrows, int64_t OW, float* out,
                                 uint8_t* off) {
  auto block = [&](int64_t ow, int64_t sl) {
    __m256 m = _mm256_loadu_ps(hm[0] + sl);
    __m256i idx = _mm256_add_epi32(Avx2::loadi(hi[0] + sl), _mm256_set1_epi32(kh[0] * 3));
    for (int64_t i = 1; i < nrows; ++i) {
      const __m256 v = _mm256_loadu_ps(hm[i] + sl);
      const __m256i vi = _mm256_add_epi32(Avx2::loadi(hi[i] + sl), _mm256_set1_epi32(kh[i] * 3));
      Avx2::take(v, vi, m, idx);
    }
    _mm256_storeu_ps(out + ow, to_natural(m));
    store_u8_perm(off + ow, idx);
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow, ow);
  if (ow < OW) block(OW - 8, ow);
}

void max_pool2d_k3s2_vmerge_max_avx2(const float* const* hm, int64_t nrows, int64_t OW,
                                     float* out) {
  auto block = [&](int64_t ow, int64_t sl) {
    __m256 m = _mm256_loadu_ps(hm[0] + sl);
    for (int64_t i = 1; i < nrows; ++i) m = Avx2::maxk(_mm256_loadu_ps(hm[i] + sl), m);
    _mm256_storeu_ps(out + ow, to_natural(m));
  };
  int64_t ow = 0;
  for (; ow + 8 <= OW; ow += 8) block(ow, ow);
  if (ow < OW) block(OW - 8, ow);
}

}  // namespace fastlayers::cpu

#pragma GCC pop_options
