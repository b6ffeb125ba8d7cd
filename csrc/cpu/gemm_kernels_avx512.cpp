// AVX-512 GEMM micro-kernels (see gemm_kernels.h for the contract).
//   float : 14 x 32 tile = 28 zmm accumulators (14 rows x 2 vectors of 16)
//   double: 14 x 16 tile = 28 zmm accumulators (14 rows x 2 vectors of 8)
// Per k: two vector loads of B, fourteen broadcasts of A, 28 FMAs; 31 of the
// 32 zmm registers in use. Accumulators are named variables (no spills).
// The same variants as the AVX2 set: strided or packed A, B rows through an
// offset table (implicit-GEMM convolutions), and a transposed store of float
// tiles (a 16 x 16 register transpose per half; column-major C, the
// small-M "NT" swap and channels-last implicit convolutions).
// Only called when active_isa() == Avx512.
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "gemm_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// gcc 12 warns that the undefined pass-through vector inside the AVX-512
// shuffle and masked-load intrinsics "may be used uninitialized" (gcc bug
// 105593, fixed in gcc 13): not our code's values.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastlayers::cpu::gemm_detail {
namespace {

struct F32 {
  using T = float;
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};

struct F64 {
  using T = double;
  using V = __m512d;
  static constexpr int W = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V bcast(const double* p) { return _mm512_set1_pd(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
};

#define FL_ROWS14(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13)

// 16x16 transpose of r[0..15] in place (r[i] lane j -> r[j] lane i): pairs
// interleaved, then quads within 128-bit lanes, then 128-bit lanes across.
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[4][4];
  for (int p = 0; p < 8; ++p) {
    t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);      // a0 b0 a1 b1 per lane
    t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);  // a2 b2 a3 b3
  }
  for (int g = 0; g < 4; ++g) {  // u[g][m], 128-bit lane L: column 4L + m, rows 4g..4g+3
    u[g][0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[g][1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[g][2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[g][3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[0][m], u[1][m], 0x44);
    const __m512 x1 = _mm512_shuffle_f32x4(u[0][m], u[1][m], 0xEE);
    const __m512 y0 = _mm512_shuffle_f32x4(u[2][m], u[3][m], 0x44);
    const __m512 y1 = _mm512_shuffle_f32x4(u[2][m], u[3][m], 0xEE);
    r[m] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[4 + m] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    r[8 + m] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// Transposed store of a 14 x 32 float tile (v[h][r] = row r, lanes
// 16h..16h+15; biases already added): C[r + j * ldc] (+= when beta) for
// r < 14, j < 32, as 32 masked runs of 14 floats.
inline void store_t_14x32(__m512 (&v)[2][14], float* C, int64_t ldc, bool beta) {
  constexpr __mmask16 rows = (1u << 14) - 1;
  for (int h = 0; h < 2; ++h) {
    __m512 r[16];
    for (int i = 0; i < 14; ++i) r[i] = v[h][i];
    r[14] = r[15] = _mm512_setzero_ps();
    transpose16(r);
    for (int q = 0; q < 16; ++q) {
      float* c = C + (16 * h + q) * ldc;
      __m512 o = r[q];
      if (beta) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(rows, c));
      _mm512_mask_storeu_ps(c, rows, o);
    }
  }
}

// 14 x (2 * W) tile. kPackedA: A is a packed sliver (compile-time offsets).
// kIndirectB: row k of B is at t.B + t.b_off[k], else at t.B + k * t.b_ks.
template <class S, bool kPackedA, bool kIndirectB = false>
void kernel_14x2(const Tile<typename S::T>& t) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t a_rs = kPackedA ? 1 : t.a_rs;
  const int64_t a_ks = kPackedA ? 14 : t.a_ks;
  const int64_t b_ks = t.b_ks;
  const T* a = t.A;
  const T* b = t.B;
  const int64_t* b_off = t.b_off;
  T* C = t.C;
  const int64_t ldc = t.ldc;
  const int64_t kc = t.kc;

#define FL_DECL(r) V c##r##0 = S::zero(), c##r##1 = S::zero();
  FL_ROWS14(FL_DECL)
#undef FL_DECL

#define FL_STEP(r)                          \
  {                                         \
    const V ar = S::bcast(a + (r) * a_rs);  \
    c##r##0 = S::fma(ar, b0, c##r##0);      \
    c##r##1 = S::fma(ar, b1, c##r##1);      \
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const T* bk = kIndirectB ? b + b_off[k] : b;
    const V b0 = S::load(bk), b1 = S::load(bk + W);
    FL_ROWS14(FL_STEP)
    a += a_ks;
    if (!kIndirectB) b += b_ks;
  }
#undef FL_STEP

  V bn0 = S::zero(), bn1 = S::zero();
  if (t.bias_n) { bn0 = S::load(t.bias_n); bn1 = S::load(t.bias_n + W); }
  if constexpr (std::is_same_v<T, float>) {
    if (t.c_trans) {
#define FL_ROW(r) c##r##0,
      V v[2][14] = {{FL_ROWS14(FL_ROW)}, {}};
#undef FL_ROW
#define FL_ROW(r) v[1][r] = c##r##1;
      FL_ROWS14(FL_ROW)
#undef FL_ROW
      for (int r = 0; r < 14; ++r) {
        if (t.bias_n) { v[0][r] = S::add(v[0][r], bn0); v[1][r] = S::add(v[1][r], bn1); }
        if (t.bias_m) {
          const V bm = S::bcast(t.bias_m + r);
          v[0][r] = S::add(v[0][r], bm); v[1][r] = S::add(v[1][r], bm);
        }
      }
      store_t_14x32(v, C, ldc, t.beta);
      return;
    }
  }
#define FL_STORE(r)                                                  \
  {                                                                  \
    T* cr = C + (r) * ldc;                                           \
    V v0 = c##r##0, v1 = c##r##1;                                    \
    if (t.beta) { v0 = S::add(v0, S::load(cr)); v1 = S::add(v1, S::load(cr + W)); } \
    if (t.bias_n) { v0 = S::add(v0, bn0); v1 = S::add(v1, bn1); }   \
    if (t.bias_m) {                                                  \
      const V bm = S::bcast(t.bias_m + (r));                         \
      v0 = S::add(v0, bm); v1 = S::add(v1, bm);                      \
    }                                                                \
    S::store(cr, v0); S::store(cr + W, v1);                          \
  }
  FL_ROWS14(FL_STORE)
#undef FL_STORE
}

#undef FL_ROWS14

}  // namespace

}  // namespace fastlayers::cpu::gemm_detail

#pragma GCC diagnostic pop
#pragma GCC pop_options

// The kernel tables are built with baseline flags (safe on any CPU).
namespace fastlayers::cpu::gemm_detail {

KernelSet<float> avx512_kernels_f32() {
  KernelSet<float> s;
  s.MR = 14; s.NR = 32;
  s.MC = 140; s.KC = 256; s.NC = 4064;
  s.packed_a = &kernel_14x2<F32, true>;
  s.strided_a = &kernel_14x2<F32, false>;
  s.indirect_b = &kernel_14x2<F32, true, true>;
  s.store_t = true;
  s.pack_t = &pack_t_f32_avx2;  // AVX-512 CPUs have AVX2
  s.transpose = &transpose_f32_avx2;
  s.dot = &gemm_dot_f32_avx2;
  s.fill_b_row = &fill_b_row_f32_avx2;  // R = 32: four 8-lane steps
  return s;
}

KernelSet<double> avx512_kernels_f64() {
  KernelSet<double> s;
  s.MR = 14; s.NR = 16;
  s.MC = 70; s.KC = 256; s.NC = 4064;
  s.packed_a = &kernel_14x2<F64, true>;
  s.strided_a = &kernel_14x2<F64, false>;
  s.indirect_b = &kernel_14x2<F64, true, true>;
  return s;
}

}  // namespace fastlayers::cpu::gemm_detail
