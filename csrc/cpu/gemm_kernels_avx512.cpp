// AVX-512 GEMM micro-kernels (see gemm_kernels.h for the contract).
//   float : 14 x 32 tile = 28 zmm accumulators (14 rows x 2 vectors of 16)
//   double: 14 x 16 tile = 28 zmm accumulators (14 rows x 2 vectors of 8)
// Per k: two vector loads of B, fourteen broadcasts of A, 28 FMAs; 31 of the
// 32 zmm registers in use. Accumulators are named variables (no spills).
// Only called when active_isa() == Avx512.
#include <immintrin.h>

#include <cstdint>

#include "gemm_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

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

template <class S, bool kPackedA>
void kernel_14x2(const Tile<typename S::T>& t) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t a_rs = kPackedA ? 1 : t.a_rs;
  const int64_t a_ks = kPackedA ? 14 : t.a_ks;
  const int64_t b_ks = t.b_ks;
  const T* a = t.A;
  const T* b = t.B;
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
    const V b0 = S::load(b), b1 = S::load(b + W);
    FL_ROWS14(FL_STEP)
    a += a_ks;
    b += b_ks;
  }
#undef FL_STEP

  V bn0 = S::zero(), bn1 = S::zero();
  if (t.bias_n) { bn0 = S::load(t.bias_n); bn1 = S::load(t.bias_n + W); }
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

#pragma GCC pop_options

// The kernel tables are built with baseline flags (safe on any CPU).
namespace fastlayers::cpu::gemm_detail {

KernelSet<float> avx512_kernels_f32() {
  KernelSet<float> s;
  s.MR = 14; s.NR = 32;
  s.MC = 140; s.KC = 256; s.NC = 4064;
  s.packed_a = &kernel_14x2<F32, true>;
  s.strided_a = &kernel_14x2<F32, false>;
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
  return s;
}

}  // namespace fastlayers::cpu::gemm_detail
