// Internal interface between the GEMM driver (gemm.cpp) and the per-ISA
// register-blocked micro-kernels (gemm_kernels_avx2.cpp, gemm_kernels_avx512.cpp,
// and the portable one in gemm.cpp).
//
// A micro-kernel computes one MR x NR tile
//   acc(r, j) = sum_{k < kc} A(r, k) * B(k, j)
// with A(r, k) = A[r * a_rs + k * a_ks] and B(k, j) = B[k * b_ks + j]
// (packed slivers: a_rs = 1, a_ks = MR, b_ks = NR; the driver may also pass a
// source matrix directly when its layout allows), then writes the whole tile
//   C[r * ldc + j] = (beta ? C[r * ldc + j] : 0) + acc(r, j)
//                    (+ bias_m[r] if bias_m) (+ bias_n[j] if bias_n)
// Edge tiles and C with a non-unit column stride go through a temporary tile
// and the driver's scalar epilogue.
#pragma once
#include <cstdint>

namespace fastlayers::cpu::gemm_detail {

template <typename T>
struct Tile {
  int64_t kc;
  const T* A; int64_t a_rs, a_ks;
  const T* B; int64_t b_ks;
  T* C; int64_t ldc;
  bool beta;
  const T* bias_m;
  const T* bias_n;
};

template <typename T>
using MicroKernel = void (*)(const Tile<T>& t);

// Optional vectorised packing routine for a B sliver stored "transposed"
// (B(k, j) = src[j * ld + k], i.e. rows of the source are columns of B):
//   dst[k * nr + j] = src[j * ld + k] for j < nr, k < kc (all nr columns valid).
template <typename T>
using PackTransposed = void (*)(int64_t kc, const T* src, int64_t ld, int nr, T* dst);

template <typename T>
struct KernelSet {
  int MR = 0, NR = 0;
  int64_t MC = 0, KC = 0, NC = 0;  // cache blocks: MC % MR == 0, NC % NR == 0
  MicroKernel<T> packed_a = nullptr;   // A(r, k) = A[r + k * MR] (a_rs, a_ks ignored)
  MicroKernel<T> strided_a = nullptr;  // A with any strides
  PackTransposed<T> pack_b_t = nullptr;  // may be null
};

// Defined in gemm_kernels_avx2.cpp / gemm_kernels_avx512.cpp. Only call the
// kernels when active_isa() says the CPU has that ISA.
KernelSet<float> avx2_kernels_f32();
void pack_b_t_f32_avx2(int64_t kc, const float* src, int64_t ld, int nr, float* dst);  // nr % 8 == 0
KernelSet<double> avx2_kernels_f64();
KernelSet<float> avx512_kernels_f32();
KernelSet<double> avx512_kernels_f64();

}  // namespace fastlayers::cpu::gemm_detail
