// BatchNorm inner kernels: a table of plain loops per ISA and dtype.
// The loops (batch_norm_simd.h) use native-width vectors for reductions and
// plain vectorisable loops elsewhere; they are compiled three times: baseline
// x86-64 (scalar path, in batch_norm.cpp), AVX2 and AVX-512
// (batch_norm_avx2.cpp, batch_norm_avx512.cpp under `#pragma GCC target`).
//
// Two data layouts (the driver, batch_norm.cpp, maps every input to one):
//   seg:  a contiguous run of n values of ONE channel (NCHW-like input).
//   rows: R rows of C channels, row stride C (channels-last, or (N, C)).
// Statistics come back per block as (mean, M2 = sum (x - mean)^2) in double,
// computed in one sweep around a shift (the mean of the block's first few
// values) so a large mean with a small variance does not cancel; the driver
// merges blocks in a fixed order (Chan et al.), so results do not depend on
// the thread count.
#pragma once
#include <cstdint>

#include "isa.h"

namespace fastlayers::cpu {

template <typename T>
struct BnKernels {
  // mean and M2 of x[0, n)
  void (*seg_stats)(const T* x, int64_t n, double* mean, double* m2);
  // per channel c over the R rows; scratch: C doubles + 3 C values of T
  void (*rows_stats)(const T* x, int64_t R, int64_t C, double* mean, double* m2, void* scratch);
  // y = ((x - mh) - ml) * a + b   (mh + ml: the mean split in two T's)
  // nt: non-temporal (streaming) stores of y; the caller issues the fence.
  void (*seg_affine)(const T* x, int64_t n, T mh, T ml, T a, T b, T* y, bool nt);
  void (*rows_affine)(const T* x, int64_t R, int64_t C, const T* mh, const T* ml, const T* a,
                      const T* b, T* y, bool nt);
  // sdy = sum dy, sdyx = sum dy * (x - m)
  void (*seg_bwd_reduce)(const T* dy, const T* x, int64_t n, T m, double* sdy, double* sdyx);
  // per channel; scratch: 2 C values of T
  void (*rows_bwd_reduce)(const T* dy, const T* x, int64_t R, int64_t C, const T* m, double* sdy,
                          double* sdyx, void* scratch);
  // dx = ((dy - k) - (x - m) * b) * a; x == nullptr means b = k = 0 (dx = dy * a)
  // nt as in seg_affine
  void (*seg_bwd_apply)(const T* dy, const T* x, int64_t n, T m, T a, T b, T k, T* dx, bool nt);
  void (*rows_bwd_apply)(const T* dy, const T* x, int64_t R, int64_t C, const T* m, const T* a,
                         const T* b, const T* k, T* dx, bool nt);
};

void bn_kernels_scalar(BnKernels<float>* f, BnKernels<double>* d);
void bn_kernels_avx2(BnKernels<float>* f, BnKernels<double>* d);
void bn_kernels_avx512(BnKernels<float>* f, BnKernels<double>* d);

}  // namespace fastlayers::cpu
