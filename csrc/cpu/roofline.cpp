// Machine roofline probe for the benchmark report: the fp32 FMA peak of this
// CPU with all of torch's threads, measured, not assumed. Register-resident
// FMAs on 12 independent accumulators (enough to cover FMA latency x ports),
// in the widest vectors of the active kernel path: on a CPU with full-width
// 512-bit FMA units (Zen 5) zmm FMAs run twice the FLOPs of ymm ones, so an
// AVX2 probe would put the AVX-512 GEMM at 150-160 % of "peak".
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <chrono>
#include <immintrin.h>

#include "isa.h"

namespace fastlayers::cpu {
namespace {

// Distinct starting values: with equal ones gcc merges the twelve identical
// recurrences into one latency-bound chain, and the "peak" comes out 1.5x
// too high (12 FMAs counted per 4-cycle FMA latency).
#define FL_FMA_LOOP(NAME, V, SET1, FMA, ADD, STORE, LANES)                               \
  __attribute__((noinline)) float NAME(int64_t iters) {                                  \
    V a0 = SET1(0.00f), a1 = SET1(0.01f), a2 = SET1(0.02f), a3 = SET1(0.03f);            \
    V a4 = SET1(0.04f), a5 = SET1(0.05f), a6 = SET1(0.06f), a7 = SET1(0.07f);            \
    V a8 = SET1(0.08f), a9 = SET1(0.09f), a10 = SET1(0.10f), a11 = SET1(0.11f);          \
    const V x = SET1(0.999999f), y = SET1(1e-7f);                                        \
    for (int64_t i = 0; i < iters; ++i) {                                                \
      a0 = FMA(a0, x, y); a1 = FMA(a1, x, y); a2 = FMA(a2, x, y); a3 = FMA(a3, x, y);    \
      a4 = FMA(a4, x, y); a5 = FMA(a5, x, y); a6 = FMA(a6, x, y); a7 = FMA(a7, x, y);    \
      a8 = FMA(a8, x, y); a9 = FMA(a9, x, y); a10 = FMA(a10, x, y); a11 = FMA(a11, x, y); \
    }                                                                                    \
    V s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));             \
    s = ADD(s, ADD(ADD(a8, a9), ADD(a10, a11)));                                         \
    float out[LANES];                                                                    \
    STORE(out, s);                                                                       \
    return out[0];                                                                       \
  }

#pragma GCC push_options
#pragma GCC target("avx2,fma")
FL_FMA_LOOP(fma_loop_avx2, __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,
            _mm256_storeu_ps, 8)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
FL_FMA_LOOP(fma_loop_avx512, __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,
            _mm512_storeu_ps, 16)
#pragma GCC pop_options
#undef FL_FMA_LOOP

// GFLOP/s of fp32 FMAs over all threads (2 FLOP per lane per FMA).
double fma_peak_gflops(int64_t iters) {
  TORCH_CHECK(active_isa() != Isa::Scalar,
              "fma_peak_gflops needs AVX2+FMA (the scalar path has no FMA roofline)");
  const bool wide = active_isa() == Isa::Avx512;
  auto loop = wide ? &fma_loop_avx512 : &fma_loop_avx2;
  const int lanes = wide ? 16 : 8;
  const int nt = at::get_num_threads();
  volatile float sink = 0;
  loop(iters / 10);  // warm up clocks
  auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sink = sink + loop(iters);
  });
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(nt) * double(iters) * 12 * lanes * 2 / s / 1e9;
}

}  // namespace
}  // namespace fastlayers::cpu

namespace fastlayers {
double fma_peak_gflops(int64_t iters) { return cpu::fma_peak_gflops(iters); }
}  // namespace fastlayers
