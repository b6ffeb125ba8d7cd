// BatchNorm loops (see batch_norm_kernels.h for the contracts). Written with
// lane arrays of 64 bytes (16 float / 8 double) that the compiler turns into
// vector registers; no reassociation is needed, so results are identical for
// a given ISA and do not depend on threads. Include after the ISA's
// `#pragma GCC target` with FL_BN_SIMD_IMPL naming a namespace unique to it.
#include "batch_norm_kernels.h"

namespace fastlayers::cpu {
namespace FL_BN_SIMD_IMPL {

template <typename T>
constexpr int kLanes = 64 / static_cast<int>(sizeof(T));

template <typename T>
void seg_stats(const T* x, int64_t n, double* mean, double* m2) {
  constexpr int L = kLanes<T>;
  // Pass 1: the shift, mean estimated in double.
  double s[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) s[j] += static_cast<double>(x[i + j]);
  double tot = 0;
  for (int j = 0; j < L; ++j) tot += s[j];
  for (; i < n; ++i) tot += static_cast<double>(x[i]);
  const T shift = static_cast<T>(tot / static_cast<double>(n));
  // Pass 2 (block is in cache): shifted sums.
  T a1[L] = {}, a2[L] = {};
  for (i = 0; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) {
      const T d = x[i + j] - shift;
      a1[j] += d;
      a2[j] += d * d;
    }
  double S1 = 0, S2 = 0;
  for (int j = 0; j < L; ++j) { S1 += a1[j]; S2 += a2[j]; }
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
  constexpr int L = kLanes<T>;
  T a1[L] = {}, a2[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) {
      a1[j] += dy[i + j];
      a2[j] += dy[i + j] * (x[i + j] - m);
    }
  double S1 = 0, S2 = 0;
  for (int j = 0; j < L; ++j) { S1 += a1[j]; S2 += a2[j]; }
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
