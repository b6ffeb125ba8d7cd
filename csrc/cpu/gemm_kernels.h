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
// and the driver's scalar epilogue, except full tiles of a column-major C
// when the kernels can store transposed (Tile::c_trans, KernelSet::store_t).
#pragma once
#include <cstdint>

#include "gemm.h"

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
  // Store the tile transposed: acc(r, j) goes to C[r + j * ldc] (only for
  // full tiles, and only to kernels whose KernelSet says store_t).
  bool c_trans = false;
  // For KernelSet::indirect_b only: row k of B is at B + b_off[k] (b_ks unused).
  const int64_t* b_off = nullptr;
};

template <typename T>
using MicroKernel = void (*)(const Tile<T>& t);

// Optional vectorised packing of a sliver whose source runs along k:
//   dst[k * R + j] = src[j * ld + k] for j < nr <= R, k < kc; lanes [nr, R)
// untouched (an A sliver with csA == 1, R = MR; a B sliver with rsB == 1,
// R = NR; nr < R at the matrix edge, the caller zeroes the other lanes).
template <typename T>
using PackTransposed = void (*)(int64_t kc, const T* src, int64_t ld, int nr, T* dst, int R);

// Dot-product GEMM for the "NT" layout with a tiny M (A rows and B columns
// contiguous along k): C(i, j) for i < M, n0 <= j < n1 with
//   C(i, j) = dot(A + i * lda, B + j * ldb, K), then the epilogue store_dot.
template <typename T>
struct DotArgs {
  int64_t M, K, n0, n1;
  const T* A; int64_t lda;
  const T* B; int64_t ldb;
  T* C; int64_t rsC, csC;
  bool beta;
  const T* bias_m;
  const T* bias_n;
};

template <typename T>
inline void store_dot(const DotArgs<T>& g, int64_t i, int64_t j, T v) {
  T* c = g.C + i * g.rsC + j * g.csC;
  if (g.beta) v += *c;
  if (g.bias_m) v += g.bias_m[i];
  if (g.bias_n) v += g.bias_n[j];
  *c = v;
}

template <typename T>
using DotKernel = void (*)(const DotArgs<T>& g);

// Row k of packed-B slivers from contiguous source runs (gemm.h: SliverFill,
// gemm_fill_b_row): for each f, lanes [f.l0, f.l1) of row + f.sliver * sl get
// x[f.src ...], the other R lanes zero; x[0, limit) may be read.
template <typename T>
using FillBRow = void (*)(const SliverFill* f, int64_t n, const T* x, int64_t limit, T* row,
                          int64_t sl, int R);

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols.
template <typename T>
using Transpose = void (*)(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst,
                           int64_t ldd);

template <typename T>
struct KernelSet {
  int MR = 0, NR = 0;
  int64_t MC = 0, KC = 0, NC = 0;  // cache blocks: MC % MR == 0, NC % NR == 0
  MicroKernel<T> packed_a = nullptr;   // A(r, k) = A[r + k * MR] (a_rs, a_ks ignored)
  MicroKernel<T> strided_a = nullptr;  // A with any strides
  MicroKernel<T> indirect_b = nullptr; // A packed, B rows at B + b_off[k]; may be null
  PackTransposed<T> pack_t = nullptr;  // may be null
  bool store_t = false;                // the kernels honour Tile::c_trans
  DotKernel<T> dot = nullptr;          // may be null
  FillBRow<T> fill_b_row = nullptr;    // may be null
  Transpose<T> transpose = nullptr;    // may be null
};

// Defined in gemm_kernels_avx2.cpp / gemm_kernels_avx512.cpp. Only call the
// kernels when active_isa() says the CPU has that ISA.
KernelSet<float> avx2_kernels_f32();
void pack_t_f32_avx2(int64_t kc, const float* src, int64_t ld, int nr, float* dst, int R);
void gemm_dot_f32_avx2(const DotArgs<float>& g);
void fill_b_row_f32_avx2(const SliverFill* f, int64_t n, const float* x, int64_t limit,
                         float* row, int64_t sl, int R);
void transpose_f32_avx2(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst,
                        int64_t ldd);
KernelSet<double> avx2_kernels_f64();
KernelSet<float> avx512_kernels_f32();
KernelSet<double> avx512_kernels_f64();

}  // namespace fastlayers::cpu::gemm_detail
