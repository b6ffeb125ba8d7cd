// MaxPool2d forward, AVX-512 path (16 float lanes). Algorithm: max_pool2d_kernels.h.
// Runs only when active_isa() is Avx512.
#include <immintrin.h>

#include <cstdint>

#include "max_pool2d_kernels.h"

#pragma GCC push_options
// GCC 12 warns falsely inside its own AVX-512 headers (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

#define FL_POOL_SIMD_IMPL pool_avx512
#include "max_pool2d_simd.h"

namespace fastlayers::cpu {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  using V = __m512;
  using I = __m512i;
  using M = __mmask16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_n(const float* p, int64_t n) {  // lanes >= n read as 0, not touched
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
  }
  static V load_s2(const float* p) {  // p[0], p[2], ..., p[30]
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutex2var_ps(_mm512_loadu_ps(p), ev, _mm512_loadu_ps(p + 16));
  }
  static void load_s2_pair(const float* p, V& ev, V& od) {  // p[2j] and p[2j + 1]
    const __m512i e = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i o = _mm512_add_epi32(e, _mm512_set1_epi32(1));
    const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    ev = _mm512_permutex2var_ps(a, e, b);
    od = _mm512_permutex2var_ps(a, o, b);
  }
  static I lane_mul(int32_t s) {
    return _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(s));
  }
  static V gather(const float* p, I lanes) { return _mm512_i32gather_ps(lanes, p, 4); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static I seti(int32_t x) { return _mm512_set1_epi32(x); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static M upd(V v, V m) {
    return static_cast<M>(_mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
  }
  static V blend(V a, V b, M u) { return _mm512_mask_blend_ps(u, a, b); }
  static I blendi(I a, I b, M u) { return _mm512_mask_blend_epi32(u, a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_i32(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static void store_u8(uint8_t* p, I v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtusepi32_epi8(v));
  }
};

}  // namespace

void max_pool2d_rows_avx512(const PoolRowsArgs& a) { pool_avx512::pool_rows_any<Avx512>(a); }
void max_pool2d_pixel_avx512(const PoolPixelArgs& a) { pool_avx512::pool_pixel<Avx512>(a); }

}  // namespace fastlayers::cpu

#pragma GCC pop_options
