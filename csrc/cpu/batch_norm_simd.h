// BatchNorm loops (see batch_norm_kernels.h for the contracts).
//
// Reductions use GCC vector types of the ISA's NATIVE width (FL_BN_VBYTES:
// 16 for the baseline SSE2 build, 32 for AVX2, 64 for AVX-512) with four
// named accumulators; wider generic vectors would be lowered through the
// stack (5-10x slower). Per lane partial sums are in T, the final lane sums
// in double. The summation order therefore depends on the ISA (results agree
// to rounding), never on the thread count.
//
// Statistics are one sweep around a shift: the mean of the first few values
// of the block (in double, rounded to T). x - shift is then small against the
// spread even when the mean is large, so the sums do not cancel.
//
// Elementwise loops are plain loops the compiler vectorises.
// Include after the ISA's `#pragma GCC target`, with FL_BN_SIMD_IMPL naming a
// namespace unique to it and FL_BN_VBYTES the vector width in bytes.
#include <cstdint>
#include <cstring>

#include "batch_norm_kernels.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef FL_BN_VBYTES
#error "define FL_BN_VBYTES (native vector bytes) before including batch_norm_simd.h"
#endif

namespace fastlayers::cpu {
namespace FL_BN_SIMD_IMPL {

// Native-width vector of T.
template <typename T>
struct Vn {
  static constexpr int L = FL_BN_VBYTES / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(FL_BN_VBYTES)));
  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static inline V splat(T s) { return V{} + s; }
  // Lane sum in double, pairwise (a short dependency chain).
  static inline double hsum(V v) {
    double t[L];
    for (int j = 0; j < L; ++j) t[j] = static_cast<double>(v[j]);
    for (int w = L / 2; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) t[j] += t[j + w];
    return t[0];
  }
  // Non-temporal store to a FL_BN_VBYTES-aligned p (a plain store where the
  // ISA has none).
  static inline void stream(T* p, V v) {
// (g++ does not define __AVX__ etc. under `#pragma GCC target`: the width
// names the ISA.)
#if FL_BN_VBYTES == 64 && defined(__x86_64__)
    if constexpr (sizeof(T) == 4) _mm512_stream_ps(reinterpret_cast<float*>(p), (__m512)v);
    else _mm512_stream_pd(reinterpret_cast<double*>(p), (__m512d)v);
#elif FL_BN_VBYTES == 32 && defined(__x86_64__)
    if constexpr (sizeof(T) == 4) _mm256_stream_ps(reinterpret_cast<float*>(p), (__m256)v);
    else _mm256_stream_pd(reinterpret_cast<double*>(p), (__m256d)v);
#elif FL_BN_VBYTES == 16 && defined(__SSE2__)
    if constexpr (sizeof(T) == 4) _mm_stream_ps(reinterpret_cast<float*>(p), (__m128)v);
    else _mm_stream_pd(reinterpret_cast<double*>(p), (__m128d)v);
#else
    std::memcpy(p, &v, sizeof v);
#endif
  }
};

// y[i] = f(i) for i in [0, n), with streaming stores when nt: scalar head up
// to the cache-line alignment of y, streamed whole lines, scalar tail. fs(i) is
// the scalar form, fv(i) the vector form of the same expression.
template <typename T, typename FS, typename FV>
inline void store_loop(T* y, int64_t n, bool nt, FS fs, FV fv) {
  using X = Vn<T>;
  constexpr int L = X::L;
  if (!nt) {
    for (int64_t i = 0; i < n; ++i) y[i] = fs(i);
    return;
  }
  // Whole 64-byte lines only: a line never mixes streaming and plain stores.
  constexpr int64_t kLine = 64 / sizeof(T);
  int64_t i = 0;
  for (; i < n && reinterpret_cast<uintptr_t>(y + i) % 64 != 0; ++i) y[i] = fs(i);
  for (; i + kLine <= n; i += kLine)
    for (int64_t j = 0; j < kLine; j += L) X::stream(y + i + j, fv(i + j));
  for (; i < n; ++i) y[i] = fs(i);
}

constexpr int64_t kShiftValues = 32;  // values averaged for the shift

// Sums of d = x - s and d * d over x[0, n): four accumulators per sum.
template <typename T>
inline void shifted_sums(const T* x, int64_t n, T s, double* S1, double* S2) {
  using X = Vn<T>;
  using V = typename X::V;
  constexpr int L = X::L;
  const V vs = X::splat(s);
  V a0 = {}, a1 = {}, a2 = {}, a3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const V d0 = X::load(x + i) - vs, d1 = X::load(x + i + L) - vs;
    const V d2 = X::load(x + i + 2 * L) - vs, d3 = X::load(x + i + 3 * L) - vs;
    a0 += d0; q0 += d0 * d0;
    a1 += d1; q1 += d1 * d1;
    a2 += d2; q2 += d2 * d2;
    a3 += d3; q3 += d3 * d3;
  }
  for (; i + L <= n; i += L) {
    const V d = X::load(x + i) - vs;
    a0 += d; q0 += d * d;
  }
  if (i < n) {  // tail: one vector padded with s (d = 0 there)
    T t[L];
    for (int j = 0; j < L; ++j) t[j] = i + j < n ? x[i + j] : s;
    const V d = X::load(t) - vs;
    a1 += d; q1 += d * d;
  }
  *S1 = X::hsum((a0 + a1) + (a2 + a3));
  *S2 = X::hsum((q0 + q1) + (q2 + q3));
}

inline double clamp_m2(double v) { return v > 0 ? v : (v == v ? 0.0 : v); }

template <typename T>
void seg_stats(const T* x, int64_t n, double* mean, double* m2) {
  using X = Vn<T>;
  const int64_t n0 = n < kShiftValues ? n : kShiftValues;
  double t = 0;
  if (n0 == kShiftValues) {  // a few vector adds (in T: the shift need not be exact)
    typename X::V v = X::load(x);
    for (int64_t i = X::L; i < kShiftValues; i += X::L) v += X::load(x + i);
    t = X::hsum(v);
  } else {
    for (int64_t i = 0; i < n0; ++i) t += static_cast<double>(x[i]);
  }
  const T shift = static_cast<T>(t / static_cast<double>(n0));
  double S1, S2;
  shifted_sums(x, n, shift, &S1, &S2);
  const double dn = static_cast<double>(n);
  *mean = static_cast<double>(shift) + S1 / dn;
  *m2 = clamp_m2(S2 - S1 * S1 / dn);
}

// Shift per channel: the mean of the first few rows.
template <typename T>
void rows_stats(const T* x, int64_t R, int64_t C, double* mean, double* m2, void* scratch) {
  double* s = static_cast<double*>(scratch);
  T* shift = reinterpret_cast<T*>(s + C);
  T* a1 = shift + C;
  T* a2 = a1 + C;
  const int64_t r0 = R < 8 ? R : 8;
  for (int64_t c = 0; c < C; ++c) s[c] = 0;
  for (int64_t r = 0; r < r0; ++r) {
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) s[c] += static_cast<double>(xr[c]);
  }
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<T>(s[c] / static_cast<double>(r0));
    a1[c] = 0;
    a2[c] = 0;
  }
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const T d = xr[c] - shift[c];
      a1[c] += d;
      a2[c] += d * d;
    }
  }
  const double dR = static_cast<double>(R);
  for (int64_t c = 0; c < C; ++c) {
    const double S1 = a1[c];
    mean[c] = static_cast<double>(shift[c]) + S1 / dR;
    m2[c] = clamp_m2(static_cast<double>(a2[c]) - S1 * S1 / dR);
  }
}

template <typename T>
void seg_affine(const T* x, int64_t n, T mh, T ml, T a, T b, T* y, bool nt) {
  using X = Vn<T>;
  const auto vmh = X::splat(mh), vml = X::splat(ml), va = X::splat(a), vb = X::splat(b);
  store_loop(
      y, n, nt, [&](int64_t i) { return ((x[i] - mh) - ml) * a + b; },
      [&](int64_t i) { return ((X::load(x + i) - vmh) - vml) * va + vb; });
}

template <typename T>
void rows_affine(const T* x, int64_t R, int64_t C, const T* mh, const T* ml, const T* a,
                 const T* b, T* y, bool nt) {
  using X = Vn<T>;
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * C;
    store_loop(
        y + r * C, C, nt, [&](int64_t c) { return ((xr[c] - mh[c]) - ml[c]) * a[c] + b[c]; },
        [&](int64_t c) {
          return ((X::load(xr + c) - X::load(mh + c)) - X::load(ml + c)) * X::load(a + c) +
                 X::load(b + c);
        });
  }
}

template <typename T>
void seg_bwd_reduce(const T* dy, const T* x, int64_t n, T m, double* sdy, double* sdyx) {
  using X = Vn<T>;
  using V = typename X::V;
  constexpr int L = X::L;
  const V vm = X::splat(m);
  V a0 = {}, a1 = {}, a2 = {}, a3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
  int64_t i = 0;
  for (; i + 4 * L <= n; i += 4 * L) {
    const V g0 = X::load(dy + i), g1 = X::load(dy + i + L);
    const V g2 = X::load(dy + i + 2 * L), g3 = X::load(dy + i + 3 * L);
    a0 += g0; q0 += g0 * (X::load(x + i) - vm);
    a1 += g1; q1 += g1 * (X::load(x + i + L) - vm);
    a2 += g2; q2 += g2 * (X::load(x + i + 2 * L) - vm);
    a3 += g3; q3 += g3 * (X::load(x + i + 3 * L) - vm);
  }
  for (; i + L <= n; i += L) {
    const V g = X::load(dy + i);
    a0 += g; q0 += g * (X::load(x + i) - vm);
  }
  if (i < n) {  // tail: one vector padded with dy = 0
    T tg[L], tx[L];
    for (int j = 0; j < L; ++j) {
      tg[j] = i + j < n ? dy[i + j] : T(0);
      tx[j] = i + j < n ? x[i + j] : m;
    }
    const V g = X::load(tg);
    a1 += g; q1 += g * (X::load(tx) - vm);
  }
  *sdy = X::hsum((a0 + a1) + (a2 + a3));
  *sdyx = X::hsum((q0 + q1) + (q2 + q3));
}

template <typename T>
void rows_bwd_reduce(const T* dy, const T* x, int64_t R, int64_t C, const T* m, double* sdy,
                     double* sdyx, void* scratch) {
  T* a1 = static_cast<T*>(scratch);
  T* a2 = a1 + C;
  for (int64_t c = 0; c < C; ++c) { a1[c] = 0; a2[c] = 0; }
  for (int64_t r = 0; r < R; ++r) {
    const T* g = dy + r * C;
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      a1[c] += g[c];
      a2[c] += g[c] * (xr[c] - m[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) { sdy[c] = a1[c]; sdyx[c] = a2[c]; }
}

template <typename T>
void seg_bwd_apply(const T* dy, const T* x, int64_t n, T m, T a, T b, T k, T* dx, bool nt) {
  using X = Vn<T>;
  const auto vm = X::splat(m), va = X::splat(a), vb = X::splat(b), vk = X::splat(k);
  if (x == nullptr) {
    store_loop(
        dx, n, nt, [&](int64_t i) { return dy[i] * a; },
        [&](int64_t i) { return X::load(dy + i) * va; });
    return;
  }
  store_loop(
      dx, n, nt, [&](int64_t i) { return ((dy[i] - k) - (x[i] - m) * b) * a; },
      [&](int64_t i) { return ((X::load(dy + i) - vk) - (X::load(x + i) - vm) * vb) * va; });
}

template <typename T>
void rows_bwd_apply(const T* dy, const T* x, int64_t R, int64_t C, const T* m, const T* a,
                    const T* b, const T* k, T* dx, bool nt) {
  using X = Vn<T>;
  for (int64_t r = 0; r < R; ++r) {
    const T* g = dy + r * C;
    T* o = dx + r * C;
    if (x == nullptr) {
      store_loop(
          o, C, nt, [&](int64_t c) { return g[c] * a[c]; },
          [&](int64_t c) { return X::load(g + c) * X::load(a + c); });
      continue;
    }
    const T* xr = x + r * C;
    store_loop(
        o, C, nt, [&](int64_t c) { return ((g[c] - k[c]) - (xr[c] - m[c]) * b[c]) * a[c]; },
        [&](int64_t c) {
          return ((X::load(g + c) - X::load(k + c)) - (X::load(xr + c) - X::load(m + c)) *
                  X::load(b + c)) * X::load(a + c);
        });
  }
}

template <typename T>
void fill(BnKernels<T>* k) {
  k->seg_stats = &seg_stats<T>;
  k->rows_stats = &rows_stats<T>;
  k->seg_affine = &seg_affine<T>;
  k->rows_affine = &rows_affine<T>;
  k->seg_bwd_reduce = &seg_bwd_reduce<T>;
  k->rows_bwd_reduce = &rows_bwd_reduce<T>;
  k->seg_bwd_apply = &seg_bwd_apply<T>;
  k->rows_bwd_apply = &rows_bwd_apply<T>;
}

}  // namespace FL_BN_SIMD_IMPL
}  // namespace fastlayers::cpu
