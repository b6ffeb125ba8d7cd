// BatchNorm loops compiled for AVX512 (see batch_norm_simd.h).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "batch_norm_kernels.h"

#pragma GCC push_options
// GCC 12 warns falsely inside its own AVX-512 headers (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

#define FL_BN_SIMD_IMPL bn_avx512
#define FL_BN_VBYTES 64
#include "batch_norm_simd.h"

namespace fastlayers::cpu {

void bn_kernels_avx512(BnKernels<float>* f, BnKernels<double>* d) {
  bn_avx512::fill(f);
  bn_avx512::fill(d);
}

}  // namespace fastlayers::cpu

#pragma GCC pop_options
