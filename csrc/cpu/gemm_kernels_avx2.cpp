// AVX2+FMA GEMM micro-kernels (see gemm_kernels.h for the contract).
//   float : 6 x 16 tile = 12 ymm accumulators (6 rows x 2 vectors of 8)
//   double: 6 x 8  tile = 12 ymm accumulators (6 rows x 2 vectors of 4)
// Per k: two vector loads of B, six broadcasts of A, twelve FMAs. The
// accumulators are named variables (an array would be spilled by gcc).
// Also: an 8x8 register transpose used to pack B slivers from a transposed
// source (Linear forward: B = W^T).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "gemm_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastlayers::cpu::gemm_detail {
namespace {

struct F32 {
  using T = float;
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

struct F64 {
  using T = double;
  using V = __m256d;
  static constexpr int W = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
};

#define FL_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)

// 8x8 transpose of r[0..7] in place (r[i] lane j -> r[j] lane i).
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Transposed store of a 6 x 16 float tile (v[h][r] = row r, lanes 8h..8h+7;
// biases already added): C[r + j * ldc] (+= when beta) for r < 6, j < 16,
// as 16 runs of 6 floats (4 + 2).
inline void store_t_6x16(__m256 (&v)[2][6], float* C, int64_t ldc, bool beta) {
  for (int h = 0; h < 2; ++h) {
    __m256 r[8] = {v[h][0], v[h][1], v[h][2], v[h][3], v[h][4], v[h][5],
                   _mm256_setzero_ps(), _mm256_setzero_ps()};
    transpose8(r);
    for (int q = 0; q < 8; ++q) {
      float* c = C + (8 * h + q) * ldc;
      __m128 lo = _mm256_castps256_ps128(r[q]);
      __m128 hi = _mm256_extractf128_ps(r[q], 1);
      if (beta) {
        lo = _mm_add_ps(lo, _mm_loadu_ps(c));
        hi = _mm_add_ps(hi, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(c + 4))));
      }
      _mm_storeu_ps(c, lo);
      _mm_store_sd(reinterpret_cast<double*>(c + 4), _mm_castps_pd(hi));
    }
  }
}

// 6 x (2 * W) tile. kPackedA: A is a packed sliver (compile-time offsets).
// kIndirectB: row k of B is at t.B + t.b_off[k] (an implicit-GEMM convolution's
// input rows), else at t.B + k * t.b_ks.
template <class S, bool kPackedA, bool kIndirectB = false>
void kernel_6x2(const Tile<typename S::T>& t) {
  using T = typename S::T;
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t a_rs = kPackedA ? 1 : t.a_rs;
  const int64_t a_ks = kPackedA ? 6 : t.a_ks;
  const int64_t b_ks = t.b_ks;
  const T* a = t.A;
  const T* b = t.B;
  const int64_t* b_off = t.b_off;
  T* C = t.C;
  const int64_t ldc = t.ldc;
  const int64_t kc = t.kc;

#define FL_DECL(r) V c##r##0 = S::zero(), c##r##1 = S::zero();
  FL_ROWS6(FL_DECL)
#undef FL_DECL
#define FL_PREF(r) _mm_prefetch(reinterpret_cast<const char*>(C + (r) * ldc), _MM_HINT_T0); \
  _mm_prefetch(reinterpret_cast<const char*>(C + (r) * ldc + 2 * W - 1), _MM_HINT_T0);
  FL_ROWS6(FL_PREF)
#undef FL_PREF

#define FL_STEP(r)                          \
  {                                         \
    const V ar = S::bcast(a + (r) * a_rs);  \
    c##r##0 = S::fma(ar, b0, c##r##0);      \
    c##r##1 = S::fma(ar, b1, c##r##1);      \
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const T* bk = kIndirectB ? b + b_off[k] : b;
    const V b0 = S::load(bk), b1 = S::load(bk + W);
    FL_ROWS6(FL_STEP)
    a += a_ks;
    if (!kIndirectB) b += b_ks;
  }
#undef FL_STEP

  V bn0 = S::zero(), bn1 = S::zero();
  if (t.bias_n) { bn0 = S::load(t.bias_n); bn1 = S::load(t.bias_n + W); }
  if constexpr (std::is_same_v<T, float>) {
    if (t.c_trans) {
      V v[2][6] = {{c00, c10, c20, c30, c40, c50}, {c01, c11, c21, c31, c41, c51}};
      for (int r = 0; r < 6; ++r) {
        if (t.bias_n) { v[0][r] = S::add(v[0][r], bn0); v[1][r] = S::add(v[1][r], bn1); }
        if (t.bias_m) {
          const V bm = S::bcast(t.bias_m + r);
          v[0][r] = S::add(v[0][r], bm); v[1][r] = S::add(v[1][r], bm);
        }
      }
      store_t_6x16(v, C, ldc, t.beta);
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
  FL_ROWS6(FL_STORE)
#undef FL_STORE
}
#undef FL_ROWS6

}  // namespace

namespace {
// Stores the first n (< 8) lanes of v.
inline void store_first(float* d, __m256 v, int n) {
  __m128 x = _mm256_castps256_ps128(v);
  if (n >= 4) {
    _mm_storeu_ps(d, x);
    d += 4;
    n -= 4;
    x = _mm256_extractf128_ps(v, 1);
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(d), x);
    d += 2;
    n -= 2;
    x = _mm_movehl_ps(x, x);
  }
  if (n) _mm_store_ss(d, x);
}
}  // namespace

// dst[k * R + j] = src[j * ld + k] for j < nr <= R, k < kc: 8x8 register
// transposes (rows past nr in the last block are dummies, not stored; lanes
// [nr, R) are left as they are).
void pack_t_f32_avx2(int64_t kc, const float* src, int64_t ld, int nr, float* dst, int R) {
  const int full = nr / 8, rest = nr % 8;
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    for (int h = 0; h < full + (rest > 0); ++h) {  // rows j = 8h .. 8h+7
      const int rows = h < full ? 8 : rest;
      const float* s = src + (8 * h) * ld + k;
      const float* p[8];
      for (int r = 0; r < 8; ++r) p[r] = s + (r < rows ? r : 0) * ld;
      if ((k & 15) == 0)
        for (int r = 0; r < rows; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(p[r] + 64), _MM_HINT_T0);
      __m256 o[8];
      for (int r = 0; r < 8; ++r) o[r] = _mm256_loadu_ps(p[r]);
      transpose8(o);
      float* d = dst + k * R + 8 * h;
      if (rows == 8) {
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(d + q * R, o[q]);
      } else {  // 4 + 2 + 1 float stores (vmaskmovps stores are microcoded on AMD)
        for (int q = 0; q < 8; ++q) store_first(d + q * R, o[q], rows);
      }
    }
  }
  for (; k < kc; ++k)
    for (int j = 0; j < nr; ++j) dst[k * R + j] = src[j * ld + k];
}

// A sliver is built in registers, 8 lanes at a time, as the OR of its fills'
// loads (each zero outside its lanes), and stored once. A fill whose whole
// R-lane span lies in x[0, limit) is read with plain loads and masked with
// an AND; one that reaches past either end (the first or last pixels of a
// plane) with masked loads, which read nothing outside [l0, l1) (and are
// slower on AMD). A sliver of one fill of all R lanes is a plain copy.
void fill_b_row_f32_avx2(const SliverFill* f, int64_t n, const float* x, int64_t limit,
                         float* row, int64_t sl, int R) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  auto part = [&](const SliverFill& e, int h) {  // lanes h .. h + 7 of fill e
    const __m256i lo = _mm256_set1_epi32(e.l0 - h - 1), hi = _mm256_set1_epi32(e.l1 - h);
    const __m256i m = _mm256_and_si256(_mm256_cmpgt_epi32(lane, lo), _mm256_cmpgt_epi32(hi, lane));
    const int64_t start = e.src - e.l0;  // source of lane 0 (may be < 0)
    if (start >= 0 && start + R <= limit)
      return _mm256_and_ps(_mm256_loadu_ps(x + start + h), _mm256_castsi256_ps(m));
    if (_mm256_testz_si256(m, m)) return _mm256_setzero_ps();
    // The address of lane 0 may lie before x: form it as an integer.
    const uintptr_t p = reinterpret_cast<uintptr_t>(x) +
                        static_cast<uintptr_t>((start + h) * int64_t(sizeof(float)));
    return _mm256_maskload_ps(reinterpret_cast<const float*>(p), m);
  };
  for (int64_t i = 0; i < n;) {
    int64_t j = i;  // fills [i, j] describe one sliver
    while (!f[j].last && j + 1 < n) ++j;
    float* d = row + f[i].sliver * sl;
    if (i == j && f[i].l0 == 0 && f[i].l1 == R) {
      const float* s = x + f[i].src;
      for (int h = 0; h < R; h += 8) _mm256_storeu_ps(d + h, _mm256_loadu_ps(s + h));
    } else {
      for (int h = 0; h < R; h += 8) {
        __m256 v = part(f[i], h);
        for (int64_t q = i + 1; q <= j; ++q) v = _mm256_or_ps(v, part(f[q], h));
        _mm256_storeu_ps(d + h, v);
      }
    }
    i = j + 1;
  }
}

// 8x8 register transposes over blocks of 64 columns (the destination rows
// of a block, 64 x rows elements, are written while in cache).
namespace {
// The first n (0..8) lanes set: masks for partial rows and columns.
__m256i first_lanes(int64_t n) {
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}
}  // namespace

// dst[j * ldd + i] = src[i * lds + j], in 8 x 8 blocks (64 columns at a time);
// partial blocks (e.g. 6 channels) with masked loads and partial stores, so
// nothing outside either matrix is read or written.
void transpose_f32_avx2(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                        int64_t ldd) {
  constexpr int64_t kBlock = 64;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t j1 = std::min(cols, j0 + kBlock);
    for (int64_t i = 0; i < rows; i += 8) {
      const int rb = static_cast<int>(std::min<int64_t>(8, rows - i));
      for (int64_t j = j0; j < j1; j += 8) {
        const int cb = static_cast<int>(std::min<int64_t>(8, j1 - j));
        const __m256i cm = first_lanes(cb);
        __m256 r[8];
        for (int q = 0; q < 8; ++q) {
          const float* p = src + (i + q) * lds + j;
          r[q] = q >= rb ? _mm256_setzero_ps()
                 : cb == 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, cm);
        }
        transpose8(r);
        for (int q = 0; q < cb; ++q) {
          float* p = dst + (j + q) * ldd + i;
          if (rb == 8) _mm256_storeu_ps(p, r[q]);
          else store_first(p, r[q], rb);  // not vmaskmovps: microcoded on AMD
        }
      }
    }
  }
}

namespace {

float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

}  // namespace

// Dot-product GEMM for A with rows contiguous in k and B with columns
// contiguous in k (Linear forward with a tiny batch): for each row of A, four
// columns of B at a time, eight k per FMA; B is streamed once per row of A.
void gemm_dot_f32_avx2(const DotArgs<float>& g) {
  for (int64_t i = 0; i < g.M; ++i) {
    const float* a = g.A + i * g.lda;
    int64_t j = g.n0;
    for (; j + 4 <= g.n1; j += 4) {
      const float* b0 = g.B + j * g.ldb;
      const float* b1 = b0 + g.ldb;
      const float* b2 = b1 + g.ldb;
      const float* b3 = b2 + g.ldb;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      int64_t k = 0;
      for (; k + 8 <= g.K; k += 8) {
        const __m256 av = _mm256_loadu_ps(a + k);
        s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + k), s0);
        s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b1 + k), s1);
        s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b2 + k), s2);
        s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b3 + k), s3);
      }
      float r[4] = {hsum(s0), hsum(s1), hsum(s2), hsum(s3)};
      for (; k < g.K; ++k) {
        r[0] += a[k] * b0[k]; r[1] += a[k] * b1[k]; r[2] += a[k] * b2[k]; r[3] += a[k] * b3[k];
      }
      for (int q = 0; q < 4; ++q) store_dot(g, i, j + q, r[q]);
    }
    for (; j < g.n1; ++j) {
      const float* b = g.B + j * g.ldb;
      __m256 s = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= g.K; k += 8)
        s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s);
      float r = hsum(s);
      for (; k < g.K; ++k) r += a[k] * b[k];
      store_dot(g, i, j, r);
    }
  }
}

}  // namespace fastlayers::cpu::gemm_detail

#pragma GCC pop_options

// The kernel tables are built with baseline flags (safe on any CPU).
namespace fastlayers::cpu::gemm_detail {

KernelSet<float> avx2_kernels_f32() {
  KernelSet<float> s;
  s.MR = 6; s.NR = 16;
  s.MC = 144; s.KC = 256; s.NC = 4080;
  s.packed_a = &kernel_6x2<F32, true>;
  s.strided_a = &kernel_6x2<F32, false>;
  s.indirect_b = &kernel_6x2<F32, true, true>;
  s.pack_t = &pack_t_f32_avx2;
  s.dot = &gemm_dot_f32_avx2;
  s.fill_b_row = &fill_b_row_f32_avx2;
  s.transpose = &transpose_f32_avx2;
  s.store_t = true;
  return s;
}

KernelSet<double> avx2_kernels_f64() {
  KernelSet<double> s;
  s.MR = 6; s.NR = 8;
  s.MC = 72; s.KC = 256; s.NC = 4080;
  s.packed_a = &kernel_6x2<F64, true>;
  s.strided_a = &kernel_6x2<F64, false>;
  s.indirect_b = &kernel_6x2<F64, true, true>;
  return s;
}

}  // namespace fastlayers::cpu::gemm_detail
