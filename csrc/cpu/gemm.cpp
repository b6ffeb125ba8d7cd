// GEMM core: dispatcher plus a portable blocked reference path.
// (Optimised ISA micro-kernels plug in here; see gemm.h for the contract.)
#include "gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "isa.h"

namespace fastlayers::cpu {
namespace {

template <typename T>
void gemm_reference(const GemmArgs<T>& g) {
  const int64_t M = g.M, N = g.N, K = g.K;
  if (M == 0 || N == 0) return;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<T> acc(N);
    for (int64_t i = m0; i < m1; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        T v = g.accumulate ? g.C[i * g.rsC + j * g.csC] : T(0);
        if (g.bias_m) v += g.bias_m[i];
        if (g.bias_n) v += g.bias_n[j];
        acc[j] = v;
      }
      for (int64_t k = 0; k < K; ++k) {
        const T a = g.A[i * g.rsA + k * g.csA];
        const T* b = g.B + k * g.rsB;
        for (int64_t j = 0; j < N; ++j) acc[j] += a * b[j * g.csB];
      }
      for (int64_t j = 0; j < N; ++j) g.C[i * g.rsC + j * g.csC] = acc[j];
    }
  });
}

}  // namespace

void gemm(const GemmArgs<float>& a) { gemm_reference(a); }
void gemm(const GemmArgs<double>& a) { gemm_reference(a); }

}  // namespace fastlayers::cpu
