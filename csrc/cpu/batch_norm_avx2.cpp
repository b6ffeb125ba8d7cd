// BatchNorm loops compiled for AVX2 (see batch_norm_simd.h).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "batch_norm_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define FL_BN_SIMD_IMPL bn_avx2
#define FL_BN_VBYTES 32
#include "batch_norm_simd.h"

namespace fastlayers::cpu {

void bn_kernels_avx2(BnKernels<float>* f, BnKernels<double>* d) {
  bn_avx2::fill(f);
  bn_avx2::fill(d);
}

}  // namespace fastlayers::cpu

#pragma GCC pop_options
