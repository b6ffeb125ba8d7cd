// BatchNorm loops (see batch_norm_kernels.h for the contracts). Reductions
// use 64-byte GCC vector types (16 float / 8 double lanes, whatever the ISA,
// so all paths sum in the same order); channel loops are plain loops the
// compiler vectorises. Include after the ISA's
// `#pragma GCC target` with FL_BN_SIMD_IMPL naming a namespace unique to it.
#include "batch_norm_kernels.h"

namespace fastlayers::cpu {
namespace FL_BN_SIMD_IMPL {

// 64-byte GCC vector types: one zmm, two ymm or four xmm depending on the ISA.
template <typename T>
struct Vx {
  static constexpr int L = 64 / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(64)));
  typedef double D __attribute__((vector_size(8 * (64 / sizeof(T)))));  // L doubles
  // Unaligned load (an out-parameter: returning a wide vector would draw
  // ABI warnings where the ISA lacks that width).
  static void load(V& v, const T* p) { __builtin_memcpy(&v, p, sizeof v); }
  template <typename W>
  static double hsum(const W& v) {
    double r = 0;
    for (int j = 0; j < L; ++j) r += static_cast<double>(v[j]);
    return r;
  }
};

template <typename T>
void seg_stats(const T* x, int64_t n, double* mean, double* m2) {
  using X = Vx<T>;
  using V = typename X::V;
  using D = typename X::D;
  constexpr int L = X::L;
  // Pass 1: the shift, mean estimated in double.
  D s = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V v;
    X::load(v, x + i);
    s += __builtin_convertvector(v, D);
  }
  double tot = X::hsum(s);
  for (; i < n; ++i) tot += static_cast<double>(x[i]);
  const T shift = static_cast<T>(tot / static_cast<double>(n));
  // Pass 2 (block is in cache): shifted sums.
  V a1 = {}, a2 = {};
  for (i = 0; i + L <= n; i += L) {
    V d;
    X::load(d, x + i);
    d -= shift;
    a1 += d;
    a2 += d * d;
  }
  double S1 = X::hsum(a1), S2 = X::hsum(a2);
  for (; i < n; ++i) {
    const T d = x[i] - shift;
    S1 += d;
    S2 += static_cast<double>(d) * d;
  }
  const double dn = static_cast<double>(n);
  *mean = static_cast<double>(shift) + S1 / dn;
  const double v = S2 - S1 * S1 / dn;
  *m2 = v > 0 ? v : (v == v ? 0.0 : v);
}

template <typename T>
void rows_stats(const T* x, int64_t R, int64_t C, double* mean, double* m2, void* scratch) {
  double* s = static_cast<double*>(scratch);
  T* shift = reinterpret_cast<T*>(s + C);
  T* a1 = shift + C;
  T* a2 = a1 + C;
  for (int64_t c = 0; c < C; ++c) s[c] = 0;
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) s[c] += static_cast<double>(xr[c]);
  }
  const double dR = static_cast<double>(R);
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<T>(s[c] / dR);
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
  for (int64_t c = 0; c < C; ++c) {
    const double S1 = a1[c], v = static_cast<double>(a2[c]) - S1 * S1 / dR;
    mean[c] = static_cast<double>(shift[c]) + S1 / dR;
    m2[c] = v > 0 ? v : (v == v ? 0.0 : v);
  }
}

template <typename T>
void seg_affine(const T* x, int64_t n, T mh, T ml, T a, T b, T* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = ((x[i] - mh) - ml) * a + b;
}

template <typename T>
void rows_affine(const T* x, int64_t R, int64_t C, const T* mh, const T* ml, const T* a,
                 const T* b, T* y) {
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    for (int64_t c = 0; c < C; ++c) yr[c] = ((xr[c] - mh[c]) - ml[c]) * a[c] + b[c];
  }
}

template <typename T>
void seg_bwd_reduce(const T* dy, const T* x, int64_t n, T m, double* sdy, double* sdyx) {
  using X = Vx<T>;
  using V = typename X::V;
  constexpr int L = X::L;
  V a1 = {}, a2 = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V g, v;
    X::load(g, dy + i);
    X::load(v, x + i);
    a1 += g;
    a2 += g * (v - m);
  }
  double S1 = X::hsum(a1), S2 = X::hsum(a2);
  for (; i < n; ++i) {
    S1 += dy[i];
    S2 += static_cast<double>(dy[i] * (x[i] - m));
  }
  *sdy = S1;
  *sdyx = S2;
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
void seg_bwd_apply(const T* dy, const T* x, int64_t n, T m, T a, T b, T k, T* dx) {
  if (x == nullptr) {
    for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * a;
    return;
  }
  for (int64_t i = 0; i < n; ++i) dx[i] = ((dy[i] - k) - (x[i] - m) * b) * a;
}

template <typename T>
void rows_bwd_apply(const T* dy, const T* x, int64_t R, int64_t C, const T* m, const T* a,
                    const T* b, const T* k, T* dx) {
  for (int64_t r = 0; r < R; ++r) {
    const T* g = dy + r * C;
    T* o = dx + r * C;
    if (x == nullptr) {
      for (int64_t c = 0; c < C; ++c) o[c] = g[c] * a[c];
      continue;
    }
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) o[c] = ((g[c] - k[c]) - (xr[c] - m[c]) * b[c]) * a[c];
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
