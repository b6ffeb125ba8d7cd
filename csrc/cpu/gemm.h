// The one GEMM core shared by Linear and Conv2d (forward and backward).
//
//   C = (accumulate ? C : 0) + A . B  (+ bias_m[i] per row) (+ bias_n[j] per column)
//
// A is M x K, B is K x N, C is M x N, each given as a pointer plus a row
// stride and a column stride (element (i, j) at p[i * rs + j * cs]), so any
// transpose is free: pass the strides swapped. Index math is int64.
// Threads: at::parallel_for inside; when called from inside a parallel region
// it runs on the calling thread.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "isa.h"

namespace fastlayers::cpu {

// Workspace memory (defined in alloc.cpp): 64-byte aligned; blocks of 64 KiB
// and more are mapped pages shared with the output block cache, so large
// transient buffers do not fragment glibc's heap (see alloc.h).
void* workspace_alloc(size_t bytes);
void workspace_free(void* p, size_t bytes);

// Workspace for packed operands: 64-byte aligned, so every row of a packed
// B sliver (16 floats with AVX2) is one cache line and no vector load splits
// a line (std::vector's default allocator only guarantees 16 bytes).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(workspace_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t n) { workspace_free(p, n * sizeof(T)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
template <typename T>
using AlignedVector = std::vector<T, Aligned64<T>>;

// A 64-byte aligned buffer of n elements, left uninitialised (no zero-fill
// pass, unlike AlignedVector).
template <typename T>
class UninitBuffer {
 public:
  explicit UninitBuffer(size_t n) : p_(n ? Aligned64<T>().allocate(n) : nullptr), n_(n) {}
  ~UninitBuffer() { if (p_) Aligned64<T>().deallocate(p_, n_); }
  UninitBuffer(const UninitBuffer&) = delete;
  UninitBuffer& operator=(const UninitBuffer&) = delete;
  T* data() const { return p_; }

 private:
  T* p_;
  size_t n_;
};

template <typename T>
struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  const T* A = nullptr; int64_t rsA = 0, csA = 0;
  const T* B = nullptr; int64_t rsB = 0, csB = 0;
  T* C = nullptr;       int64_t rsC = 0, csC = 0;
  bool accumulate = false;
  const T* bias_m = nullptr;  // length M, added to every row i
  const T* bias_n = nullptr;  // length N, added to every column j
  // Optional: A (or B) already packed by gemm_pack_a (gemm_pack_b) for this
  // M, K (K, N); it then replaces A (B), whose pointer and strides are not
  // read. Requires csC == 1. Packing and use must see the same active ISA.
  const T* packed_A = nullptr;
  const T* packed_B = nullptr;
};

void gemm(const GemmArgs<float>& a);
void gemm(const GemmArgs<double>& a);

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (e.g. an NCHW
// image [C, HW] to [HW, C]). Vectorised for float on AVX2 and up.
template <typename T>
void gemm_transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd);

// Pre-packing an operand that many GEMMs share (a conv weight, over images
// and pixel tiles): packed once per op instead of once per GEMM call.
// *_size: elements of the packed buffer; the pack functions parallelise.
template <typename T>
int64_t gemm_packed_a_size(int64_t M, int64_t K, Isa isa = gemm_isa());
template <typename T>
void gemm_pack_a(int64_t M, int64_t K, const T* A, int64_t rsA, int64_t csA, T* dst,
                 Isa isa = gemm_isa());
template <typename T>
int64_t gemm_packed_b_size(int64_t K, int64_t N);
template <typename T>
void gemm_pack_b(int64_t K, int64_t N, const T* B, int64_t rsB, int64_t csB, T* dst);

// A GEMM whose B is given by row offsets into x (an implicit-GEMM
// convolution reads its input rows so, with no im2col):
//   C[i * ldc + j] = (bias_m ? bias_m[i] : 0) + sum_k A(i, k) * x[k_off[k] + j]
// for i < M, j < n (C[i + j * ldc] with c_trans), with A packed by
// gemm_pack_a (M x K). The kernels read B in whole slivers: x[k_off[k] + j]
// must be readable for every j below n rounded up to
// the path's R (the lanes past n are dropped).
// Runs on the calling thread, on the kernel path gemm_implicit_path chose
// (A packed by gemm_pack_a for that path).
template <typename T>
struct ImplicitB {
  int64_t M = 0, n = 0, K = 0;
  const T* packed_A = nullptr;
  const T* x = nullptr;
  const int64_t* k_off = nullptr;
  T* C = nullptr;
  int64_t ldc = 0;
  bool c_trans = false;
  const T* bias_m = nullptr;
  Isa isa = Isa::Scalar;  // the path (gemm_implicit_path) and its sliver width
  int64_t R = 0;
};
// The kernel path an implicit GEMM over rows of n pixels runs on, and its
// sliver width R: the active path's, except that on AVX-512 (R = 32) rows
// that 16-lane slivers cover with less waste (n = 16, 48, 112, ...) take
// the AVX2 kernels (R = 16), which every AVX-512 CPU runs.
struct ImplicitPath {
  Isa isa;
  int64_t R;
};
template <typename T>
ImplicitPath gemm_implicit_path(int64_t n);
template <typename T>
void gemm_implicit_b(const ImplicitB<T>& g);

// Where gemm_pack_b puts element (k, j) of a K x N operand, so a producer
// (im2col) can write B straight into the packed layout: per block of KC rows
// of K (KC depends on K: pass the operand's K; R alone needs none), R-column
// slivers stored k-major, lanes past N zero:
//   off(k, j) = (k / KC) * KC * Nr + (j / R) * R * kc + (k % KC) * R + j % R,
//   Nr = N rounded up to R, kc = min(KC, K - k / KC * KC).
struct PackedBLayout {
  int64_t KC;
  int64_t R;
};
template <typename T>
PackedBLayout gemm_packed_b_layout(int64_t K = 0);

// One row k of one packed-B sliver, filled from contiguous source runs (a
// producer such as im2col writing straight into the packed layout): a
// sliver is described by one or more consecutive SliverFills (the last one
// has last = true), each giving lanes [l0, l1) the values x[src],
// x[src + 1], ..., x[src + l1 - l0 - 1]; lanes no fill names get zero. The
// fills of one sliver name disjoint lanes (l0 == l1: none, x not read).
struct SliverFill {
  int64_t sliver;
  int64_t src;
  int32_t l0, l1;
  bool last;
};
// For the slivers the n fills describe, the sliver row at row + f.sliver * sl of R lanes,
// R = gemm_packed_b_layout<T>().R as read by the caller when it sized its
// buffer (checked against the active ISA's: another thread's set_isa in
// between must fail, not overflow the buffer). x[0, limit) is readable
// memory: the vector kernels may read any of it (and nothing else).
template <typename T>
void gemm_fill_b_row(const SliverFill* f, int64_t n, const T* x, int64_t limit, T* row,
                     int64_t sl, int64_t R);

}  // namespace fastlayers::cpu
