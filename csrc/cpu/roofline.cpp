// Machine roofline probe for the benchmark report: the fp32 FMA peak of this
// CPU with all of torch's threads, measured, not assumed. Register-resident
// FMAs on 12 independent accumulators (enough to cover FMA latency x ports).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <chrono>
#include <immintrin.h>

#include "isa.h"

namespace fastlayers::cpu {
namespace {

#pragma GCC push_options
#pragma GCC target("avx2,fma")
__attribute__((noinline)) float fma_loop_avx2(int64_t iters) {
  // Distinct starting values: with equal ones gcc merges the twelve identical
  // recurrences into one latency-bound chain, and the "peak" comes out 1.5x
  // too high (12 FMAs counted per 4-cycle FMA latency).
  __m256 a0 = _mm256_set1_ps(0.00f), a1 = _mm256_set1_ps(0.01f), a2 = _mm256_set1_ps(0.02f),
         a3 = _mm256_set1_ps(0.03f), a4 = _mm256_set1_ps(0.04f), a5 = _mm256_set1_ps(0.05f),
         a6 = _mm256_set1_ps(0.06f), a7 = _mm256_set1_ps(0.07f), a8 = _mm256_set1_ps(0.08f),
         a9 = _mm256_set1_ps(0.09f), a10 = _mm256_set1_ps(0.10f), a11 = _mm256_set1_ps(0.11f);
  const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = _mm256_fmadd_ps(a0, x, y); a1 = _mm256_fmadd_ps(a1, x, y);
    a2 = _mm256_fmadd_ps(a2, x, y); a3 = _mm256_fmadd_ps(a3, x, y);
    a4 = _mm256_fmadd_ps(a4, x, y); a5 = _mm256_fmadd_ps(a5, x, y);
    a6 = _mm256_fmadd_ps(a6, x, y); a7 = _mm256_fmadd_ps(a7, x, y);
    a8 = _mm256_fmadd_ps(a8, x, y); a9 = _mm256_fmadd_ps(a9, x, y);
    a10 = _mm256_fmadd_ps(a10, x, y); a11 = _mm256_fmadd_ps(a11, x, y);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];
}
#pragma GCC pop_options

// GFLOP/s of fp32 FMAs over all threads (2 FLOP per lane per FMA).
double fma_peak_gflops(int64_t iters) {
  TORCH_CHECK(active_isa() != Isa::Scalar,
              "fma_peak_gflops needs AVX2+FMA (the scalar path has no FMA roofline)");
  const int nt = at::get_num_threads();
  volatile float sink = 0;
  fma_loop_avx2(iters / 10);  // warm up clocks
  auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sink = sink + fma_loop_avx2(iters);
  });
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(nt) * double(iters) * 12 * 8 * 2 / s / 1e9;
}

}  // namespace
}  // namespace fastlayers::cpu

namespace fastlayers {
double fma_peak_gflops(int64_t iters) { return cpu::fma_peak_gflops(iters); }
}  // namespace fastlayers
