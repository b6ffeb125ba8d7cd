// MaxPool2d forward, AVX2 path (8 float lanes). Algorithm: max_pool2d_kernels.h.
#include <immintrin.h>

#include <cstdint>

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
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_i32(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static void store_u8(uint8_t* p, I v) {
    __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  }
};

}  // namespace

void max_pool2d_rows_avx2(const PoolRowsArgs& a) { pool_avx2::pool_rows_any<Avx2>(a); }
void max_pool2d_pixel_avx2(const PoolPixelArgs& a) { pool_avx2::pool_pixel<Avx2>(a); }

}  // namespace fastlayers::cpu

#pragma GCC pop_options
