// GEMM core: Goto/BLIS-style driver (contract in gemm.h).
//
//   for jc in N step NC              B panel  (KC x NC)  ~ L3
//     for pc in K step KC            pack B into NR-column slivers
//       for ic in M step MC          A block  (MC x KC)  ~ L2, packed in MR-row slivers
//         for jr in NC step NR       B sliver (KC x NR)  ~ L1
//           for ir in MC step MR     micro-kernel: MR x NR tile in registers
//
// Packing reads A and B through their strides, so every transpose is free.
// Skinny problems skip the packing of an operand that is reused little (the
// micro-kernel then reads it in place; edge slivers are still copied so no
// read goes past the matrix). Threads: one at::parallel_for per call over a
// tm x tn grid of C blocks; each thread runs the loops above on its block with
// its own (thread-local) packing buffers.
// Micro-kernels: AVX2 / AVX-512 (gemm_kernels_*.cpp) or the portable one below,
// chosen by gemm_isa() at every call (isa.h).
#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "gemm_kernels.h"
#include "isa.h"

namespace fastlayers::cpu {
namespace gemm_detail {
namespace {

// ---------------------------------------------------------------------------
// Portable micro-kernel (the Scalar ISA path and the fallback for double).
template <typename T, int MR, int NR>
void kernel_portable(const Tile<T>& t) {
  T acc[MR][NR] = {};
  const T* a = t.A;
  const T* b = t.B;
  for (int64_t k = 0; k < t.kc; ++k) {
    const T* bk = t.b_off ? t.B + t.b_off[k] : b;  // indirect_b
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r * t.a_rs];
      for (int j = 0; j < NR; ++j) acc[r][j] += ar * bk[j];
    }
    a += t.a_ks;
    b += t.b_ks;
  }
  for (int r = 0; r < MR; ++r) {
    T* c = t.C + r * t.ldc;
    for (int j = 0; j < NR; ++j) {
      T v = acc[r][j];
      if (t.beta) v += c[j];
      if (t.bias_m) v += t.bias_m[r];
      if (t.bias_n) v += t.bias_n[j];
      c[j] = v;
    }
  }
}

template <typename T>
KernelSet<T> portable_kernels() {
  KernelSet<T> s;
  s.MR = 4; s.NR = 8;
  s.MC = 128; s.KC = 256; s.NC = 4096;
  s.packed_a = &kernel_portable<T, 4, 8>;
  s.strided_a = &kernel_portable<T, 4, 8>;
  s.indirect_b = &kernel_portable<T, 4, 8>;
  return s;
}

KernelSet<float> kernels(Isa isa, float*) {
  static const KernelSet<float> portable = portable_kernels<float>();
  if (isa == Isa::Avx512) { static const KernelSet<float> k = avx512_kernels_f32(); return k; }
  if (isa == Isa::Avx2) { static const KernelSet<float> k = avx2_kernels_f32(); return k; }
  return portable;
}

KernelSet<double> kernels(Isa isa, double*) {
  static const KernelSet<double> portable = portable_kernels<double>();
  if (isa == Isa::Avx512) { static const KernelSet<double> k = avx512_kernels_f64(); return k; }
  if (isa == Isa::Avx2) { static const KernelSet<double> k = avx2_kernels_f64(); return k; }
  return portable;
}

// ---------------------------------------------------------------------------
// Thread-local, 64-byte aligned scratch buffers that only grow (the OpenMP
// threads persist, so steady-state calls allocate nothing).
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  ~Scratch() { workspace_free(p, bytes); }
  void* get(size_t need) {
    if (need > bytes) {
      workspace_free(p, bytes);
      p = nullptr;
      bytes = 0;
      const size_t n = (need + 63) / 64 * 64;
      p = workspace_alloc(n);
      bytes = n;
    }
    return p;
  }
};

template <typename T>
T* scratch(int slot, int64_t elems) {
  thread_local Scratch bufs[4];  // 0, 1: packed A / B blocks; 2: edges; 3: shared panels
  return static_cast<T*>(bufs[slot].get(static_cast<size_t>(elems) * sizeof(T)));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The depth of the K blocks for a K-deep GEMM: K in equal blocks of at most
// KC (K = 784 runs 4 x 196, not 256, 256, 256 and a 16-deep block that
// reloads and stores C for 16 steps). Packing and the driver both use it, so
// a pre-packed operand has the blocks the driver walks.
inline int64_t kc_for(int64_t KC, int64_t K) { return K <= KC ? KC : ceil_div(K, ceil_div(K, KC)); }

// ---------------------------------------------------------------------------
// Packing from a source contiguous along M (A) or N (B), k-th line at
// src + k * s_k: R-wide slivers, dst[i0 * kc + k * R + r], zero past `len`.
// k is the outer loop, so the source is read in order and each sliver is
// written as a sequential stream (a column walk per sliver missed the cache
// on every k and cost as much as the FMAs).
// Whole slivers copy a compile-time R elements (a few vector moves; a
// runtime-length loop of 6 measured ~30 % of the kernels' time in a Linear
// grad_weight); the partial last one goes element by element.
template <typename T, int R>
void pack_k_outer_r(int64_t kc, int64_t len, const T* src, int64_t s_k, T* dst) {
  const int64_t whole = len / R * R;
  for (int64_t k = 0; k < kc; ++k) {
    const T* sk = src + k * s_k;
    T* dk = dst + k * R;
    for (int64_t i0 = 0; i0 < whole; i0 += R) std::memcpy(dk + i0 * kc, sk + i0, R * sizeof(T));
    if (whole < len) {
      T* d = dk + whole * kc;
      const int n = static_cast<int>(len - whole);
      for (int r = 0; r < n; ++r) d[r] = sk[whole + r];
      for (int r = n; r < R; ++r) d[r] = T(0);
    }
  }
}

template <typename T>
void pack_k_outer(int64_t kc, int64_t len, const T* src, int64_t s_k, int R, T* dst) {
  switch (R) {
    case 4: return pack_k_outer_r<T, 4>(kc, len, src, s_k, dst);
    case 6: return pack_k_outer_r<T, 6>(kc, len, src, s_k, dst);
    case 14: return pack_k_outer_r<T, 14>(kc, len, src, s_k, dst);
    case 8: return pack_k_outer_r<T, 8>(kc, len, src, s_k, dst);
    case 16: return pack_k_outer_r<T, 16>(kc, len, src, s_k, dst);
    case 32: return pack_k_outer_r<T, 32>(kc, len, src, s_k, dst);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const T* sk = src + k * s_k;
    for (int64_t i0 = 0; i0 < len; i0 += R) {
      const int n = static_cast<int>(std::min<int64_t>(R, len - i0));
      T* dk = dst + i0 * kc + k * R;
      for (int r = 0; r < n; ++r) dk[r] = sk[i0 + r];
      for (int r = n; r < R; ++r) dk[r] = T(0);
    }
  }
}

// Packing. A block (mc x kc) -> MR-row slivers, dst[ir * kc + k * MR + r];
// B block (kc x nc) -> NR-column slivers, dst[jr * kc + k * NR + j].
// Rows / columns past the edge are zero.
template <typename T>
void pack_a(const KernelSet<T>& ks, int64_t mc, int64_t kc, const T* A, int64_t rsA, int64_t csA,
            T* dst) {
  const int MR = ks.MR;
  if (rsA == 1 && csA != 1) return pack_k_outer(kc, mc, A, csA, MR, dst);
  for (int64_t ir = 0; ir < mc; ir += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
    const T* s = A + ir * rsA;
    T* d = dst + ir * kc;
    if (csA == 1 && ks.pack_t) {
      if (mr < MR) std::fill(d, d + kc * MR, T(0));
      ks.pack_t(kc, s, rsA, mr, d, MR);
      continue;
    }
    if (csA == 1) {  // rows contiguous: read each row once, scatter with stride MR
      for (int r = 0; r < mr; ++r) {
        const T* sr = s + r * rsA;
        for (int64_t k = 0; k < kc; ++k) d[k * MR + r] = sr[k];
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int r = 0; r < mr; ++r) d[k * MR + r] = s[r * rsA + k * csA];
    }
    for (int r = mr; r < MR; ++r)
      for (int64_t k = 0; k < kc; ++k) d[k * MR + r] = T(0);
  }
}

template <typename T>
void pack_b(const KernelSet<T>& ks, int64_t kc, int64_t nc, const T* B, int64_t rsB, int64_t csB,
            T* dst) {
  const int NR = ks.NR;
  if (csB == 1) return pack_k_outer(kc, nc, B, rsB, NR, dst);
  for (int64_t jr = 0; jr < nc; jr += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
    const T* s = B + jr * csB;
    T* d = dst + jr * kc;
    if (rsB == 1 && ks.pack_t) {
      if (nr < NR) std::fill(d, d + kc * NR, T(0));
      ks.pack_t(kc, s, csB, nr, d, NR);
      continue;
    }
    for (int j = 0; j < nr; ++j) {
      const T* sj = s + j * csB;
      for (int64_t k = 0; k < kc; ++k) d[k * NR + j] = sj[k * rsB];
    }
    for (int j = nr; j < NR; ++j)
      for (int64_t k = 0; k < kc; ++k) d[k * NR + j] = T(0);
  }
}

// ---------------------------------------------------------------------------
// One thread's share: C[m0:m1, n0:n1], all of K.
template <typename T>
void gemm_block(const GemmArgs<T>& g, const KernelSet<T>& ks, bool packA, bool packB,
                int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int MR = ks.MR, NR = ks.NR;
  const int64_t kc_max = std::min(ks.KC, g.K);
  const int64_t mc_max = std::min(ks.MC, round_up(m1 - m0, MR));
  const int64_t nc_max = std::min(ks.NC, round_up(n1 - n0, NR));
  T* const Ap_buf = packA && !g.packed_A ? scratch<T>(0, mc_max * kc_max) : nullptr;
  T* const Bp_buf = packB && !g.packed_B ? scratch<T>(1, nc_max * kc_max) : nullptr;
  const int64_t Mr = round_up(g.M, MR), Nr = round_up(g.N, NR);  // pre-packed panel heights
  const T* Ap = Ap_buf;
  const T* Bp = Bp_buf;
  T* misc = scratch<T>(2, MR * NR + (MR + NR) * kc_max);
  T* ctile = misc;                  // MR x NR temporary tile
  T* a_edge = misc + MR * NR;       // last partial A sliver (unpacked A)
  T* b_edge = a_edge + MR * kc_max; // partial B sliver (unpacked B)

  for (int64_t jc = n0; jc < n1; jc += ks.NC) {
    const int64_t nc = std::min(ks.NC, n1 - jc);
    for (int64_t pc = 0; pc < g.K; pc += ks.KC) {
      const int64_t kc = std::min(ks.KC, g.K - pc);
      const bool first = pc == 0;
      const bool beta = !first || g.accumulate;
      const T* Bsrc = g.B + pc * g.rsB + jc * g.csB;
      if (g.packed_B) Bp = g.packed_B + pc * Nr + jc * kc;
      else if (packB) pack_b(ks, kc, nc, Bsrc, g.rsB, g.csB, Bp_buf);
      for (int64_t ic = m0; ic < m1; ic += ks.MC) {
        const int64_t mc = std::min(ks.MC, m1 - ic);
        const T* Asrc = g.A + ic * g.rsA + pc * g.csA;
        if (g.packed_A) {
          Ap = g.packed_A + pc * Mr + ic * kc;
        } else if (packA) {
          pack_a(ks, mc, kc, Asrc, g.rsA, g.csA, Ap_buf);
        } else if (mc % MR) {
          const int64_t last = mc / MR * MR;
          pack_a(ks, mc - last, kc, Asrc + last * g.rsA, g.rsA, g.csA, a_edge);
        }
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
          Tile<T> t;
          t.kc = kc;
          if (packB) {
            t.B = Bp + jr * kc; t.b_ks = NR;
          } else if (nr == NR) {  // unpacked B has csB == 1
            t.B = Bsrc + jr; t.b_ks = g.rsB;
          } else {
            pack_b(ks, kc, nr, Bsrc + jr * g.csB, g.rsB, g.csB, b_edge);
            t.B = b_edge; t.b_ks = NR;
          }
          for (int64_t ir = 0; ir < mc; ir += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
            MicroKernel<T> kern = ks.packed_a;
            if (packA) {
              t.A = Ap + ir * kc; t.a_rs = 1; t.a_ks = MR;
            } else if (mr == MR) {
              t.A = Asrc + ir * g.rsA; t.a_rs = g.rsA; t.a_ks = g.csA;
              kern = ks.strided_a;
            } else {
              t.A = a_edge; t.a_rs = 1; t.a_ks = MR;
            }
            const int64_t i0 = ic + ir, j0 = jc + jr;
            const T* bm = first && g.bias_m ? g.bias_m + i0 : nullptr;
            const T* bn = first && g.bias_n ? g.bias_n + j0 : nullptr;
            T* c = g.C + i0 * g.rsC + j0 * g.csC;
            if (mr == MR && nr == NR && (g.csC == 1 || (g.rsC == 1 && ks.store_t))) {
              t.C = c; t.beta = beta; t.bias_m = bm; t.bias_n = bn;
              t.c_trans = g.csC != 1;
              t.ldc = t.c_trans ? g.csC : g.rsC;
              kern(t);
              continue;
            }
            t.C = ctile; t.ldc = NR; t.beta = false; t.bias_m = nullptr; t.bias_n = nullptr;
            t.c_trans = false;
            kern(t);
            for (int r = 0; r < mr; ++r) {
              T* cr = c + r * g.rsC;
              for (int j = 0; j < nr; ++j) {
                T v = ctile[r * NR + j];
                if (beta) v += cr[j * g.csC];
                if (bm) v += bm[r];
                if (bn) v += bn[j];
                cr[j * g.csC] = v;
              }
            }
          }
        }
      }
    }
  }
}

// Whole-operand packing: per KC block of K, the panels pack_a / pack_b
// write for the full M (N), so block (pc, i0) of A sits at pc * Mr + i0 * kc
// (Mr = M rounded up to MR), as gemm_block reads it.
template <typename T>
// s_mn / s_k: X's strides along M (or N) and along K.
void pack_all(bool is_a, int64_t MN, int64_t K, const T* X, int64_t s_mn, int64_t s_k, T* dst,
              Isa isa = gemm_isa()) {
  const KernelSet<T> ks = kernels(isa, static_cast<T*>(nullptr));
  const int64_t R = is_a ? ks.MR : ks.NR, MNr = round_up(MN, R), KC = kc_for(ks.KC, K);
  const int64_t nslab = ceil_div(MN, R), nkb = ceil_div(K, KC);
  // Items: (K block, group of slivers) pairs, so a short K still splits.
  const int64_t per = std::max<int64_t>(1, std::min<int64_t>(nslab, 16));
  const int64_t groups = ceil_div(nslab, per);
  at::parallel_for(0, nkb * groups, 1, [&](int64_t b, int64_t e) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t pc = (it / groups) * KC, kc = std::min(KC, K - pc);
      const int64_t r0 = (it % groups) * per * R, rn = std::min(per * R, MN - r0);
      T* d = dst + pc * MNr + r0 * kc;
      const T* src = X + r0 * s_mn + pc * s_k;
      if (is_a) pack_a(ks, rn, kc, src, s_mn, s_k, d);
      else pack_b(ks, kc, rn, src, s_k, s_mn, d);
    }
  });
}

// K == 0: C = (accumulate ? C : 0) + biases.
template <typename T>
void gemm_no_k(const GemmArgs<T>& g) {
  at::parallel_for(0, g.M, std::max<int64_t>(1, 32768 / g.N), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < g.N; ++j) {
        T& c = g.C[i * g.rsC + j * g.csC];
        T v = g.accumulate ? c : T(0);
        if (g.bias_m) v += g.bias_m[i];
        if (g.bias_n) v += g.bias_n[j];
        c = v;
      }
  });
}

// K == 1, row-major C, no biases: C[i, :] = (accumulate ? C[i, :] : 0) + A[i, 0] B[0, :],
// bitwise what the micro-kernels give (a b rounded, then + c).
template <typename T>
void gemm_rank1(const GemmArgs<T>& g) {
  const int64_t grain = std::max<int64_t>(1, 32768 / g.N);
  at::parallel_for(0, g.M, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T a = g.A[i * g.rsA];
      T* c = g.C + i * g.rsC;
      const T* b = g.B;
      const int64_t cs = g.csB;
      if (g.accumulate)
        for (int64_t j = 0; j < g.N; ++j) c[j] += a * b[j * cs];
      else
        for (int64_t j = 0; j < g.N; ++j) c[j] = a * b[j * cs];
    }
  });
}

template <typename T>
void gemm_impl(GemmArgs<T> g) {
  if (g.M <= 0 || g.N <= 0) return;
  if (g.K <= 0) return gemm_no_k(g);
  const bool prepacked = g.packed_A || g.packed_B;
  TORCH_INTERNAL_ASSERT(!prepacked || g.csC == 1, "gemm: pre-packed operands need csC == 1");
  // The kernels write rows of C; for a column-major C solve C^T = B^T A^T.
  if (g.csC != 1 && g.rsC == 1) {
    std::swap(g.M, g.N);
    std::swap(g.A, g.B);
    const int64_t rsA = g.csB, csA = g.rsB, rsB = g.csA, csB = g.rsA;
    g.rsA = rsA; g.csA = csA; g.rsB = rsB; g.csB = csB;
    std::swap(g.rsC, g.csC);
    std::swap(g.bias_m, g.bias_n);
  }
  // K == 1 (the grad_weight of a batch-1 Linear): a rank-1 update, written
  // row by row. Through the micro-kernels it would be all epilogue.
  if (g.K == 1 && !prepacked && g.csC == 1 && !g.bias_m && !g.bias_n) return gemm_rank1(g);
  KernelSet<T> ks = kernels(gemm_isa(), static_cast<T*>(nullptr));
  ks.KC = kc_for(ks.KC, g.K);
  const int64_t MR = ks.MR, NR = ks.NR;

  // Tiny M (or N) with A rows and B columns contiguous along K (Linear forward
  // at batch 1..4): dot products, so the big operand is streamed once, unpacked.
  if (!prepacked && ks.dot && g.N <= 4 && g.M > 4 && g.csA == 1 && g.rsB == 1) {
    std::swap(g.M, g.N);  // C^T = B^T A^T keeps the layout "NT"
    std::swap(g.A, g.B);
    std::swap(g.rsA, g.csB);  // rsA' = csB (csA' = rsB = 1, rsB' = csA = 1)
    std::swap(g.rsC, g.csC);
    std::swap(g.bias_m, g.bias_n);
  }
  if (!prepacked && ks.dot && g.M <= 4 && g.csA == 1 && g.rsB == 1) {
    DotArgs<T> d{g.M, g.K, 0, g.N, g.A, g.rsA, g.B, g.csB, g.C, g.rsC, g.csC,
                 g.accumulate, g.bias_m, g.bias_n};
    // Memory bound (each B column is read once): columns of 2^15 and more
    // multiply-adds per block are worth a thread.
    const int64_t grain = std::max<int64_t>(16, (1 << 15) / std::max<int64_t>(1, g.M * g.K));
    at::parallel_for(0, g.N, grain, [&](int64_t n0, int64_t n1) {
      DotArgs<T> part = d;
      part.n0 = n0; part.n1 = n1;
      ks.dot(part);
    });
    return;
  }

  // Small M in the "NT" layout (Linear forward at batch 5..8*NR, conv
  // grad_weight = dY col^T with up to 8*NR output channels): solve
  // C^T = B^T A^T instead, so the big operand (rows contiguous in K) is read
  // in place by the micro-kernel's broadcasts, never packed (packing it costs
  // ~1 cycle per element, against M / 16 cycles of FMAs), and only the small
  // one is packed; the kernels store their tiles transposed into C.
  bool nt_swap = false;
  if (!prepacked && ks.store_t && g.csA == 1 && g.rsB == 1 && g.csC == 1 && g.M > 4 &&
      g.M <= 8 * NR && g.N > g.M) {
    nt_swap = true;
    std::swap(g.M, g.N);
    std::swap(g.A, g.B);
    const int64_t rsA = g.csB, rsB = 1, csB = g.rsA;  // csA stays 1
    g.rsA = rsA; g.rsB = rsB; g.csB = csB;
    std::swap(g.rsC, g.csC);
    std::swap(g.bias_m, g.bias_n);
  }

  // Skip packing an operand that is reused little: A is reused N / NR times,
  // B is reused M / MR times (and can only be read in place with csB == 1).
  // A with rows contiguous along K is read in place up to N = 8 NR (the NCHW
  // conv forward through the NHWC GEMM, Kg = 96-128: 1.02-1.12x in A/B).
  const bool packA = g.packed_A || (!nt_swap && g.N > (g.csA == 1 ? 8 : 4) * NR);
  const bool packB = g.packed_B || !(g.csB == 1 && g.M <= 4 * MR);

  // Threads: a tm x tn grid of C blocks (multiples of MR x NR), choosing the
  // grid that minimises per-thread compute + packing (in units of K).
  const int64_t work = g.M * g.N * g.K;
  int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  // A tiny M, N or K (batch-1 grad_input, the outer product of a batch-1
  // grad_weight) makes the call memory bound: it is worth threads by the
  // elements it moves, not only by its multiply-adds.
  const int64_t moved = 8 * (g.M * g.N + g.M * g.K + g.K * g.N);
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, std::max(work, moved) / (1 << 17)));
  const int64_t bm = ceil_div(g.M, MR), bn = ceil_div(g.N, NR);  // tiles per dim
  int64_t tm = 1, tn = 1;
  double best = -1;
  for (int64_t a = 1; a <= nt; ++a) {
    if (nt % a || a > bm || nt / a > bn) continue;
    const double mt = double(ceil_div(bm, a) * MR), ntile = double(ceil_div(bn, nt / a) * NR);
    const double cost = mt * ntile / 16 + mt + ntile;
    if (best < 0 || cost < best) { best = cost; tm = a; tn = nt / a; }
  }
  if (best < 0) {  // nt does not fit the tile grid: one dimension only
    if (bn >= bm) tn = std::min(nt, bn); else tm = std::min(nt, bm);
  }
  // Block t covers tiles [bm * ti / tm, bm * (ti + 1) / tm) x likewise in N.
  auto run = [&](const GemmArgs<T>& a, bool pa, bool pb, int64_t t) {
    const int64_t ti = t / tn, tj = t % tn;
    const int64_t m0 = bm * ti / tm * MR, m1 = std::min(a.M, bm * (ti + 1) / tm * MR);
    const int64_t n0 = bn * tj / tn * NR, n1 = std::min(a.N, bn * (tj + 1) / tn * NR);
    if (m0 < m1 && n0 < n1) gemm_block(a, ks, pa, pb, m0, m1, n0, n1);
  };
  if (tm * tn == 1) return run(g, packA, packB, 0);
  // Large problems: per KC block of K, the threads first pack the A and B
  // panels together (each packs a share), then each computes its block of C
  // from the shared panels. Otherwise every thread would pack the whole
  // A (or B) panel its block needs, i.e. the same panel once per thread row
  // (column) of the grid. Workspace: (M + N) * KC elements.
  // Below ~2^26 multiply-adds the extra fork/joins cost more than the
  // packing they share.
  if (!prepacked && packA && packB && work >= (int64_t(1) << 26)) {
    const int64_t Mr = round_up(g.M, MR), Nr = round_up(g.N, NR);
    T* const panels = scratch<T>(3, (Mr + Nr) * std::min(ks.KC, g.K));  // the caller's
    for (int64_t pc = 0; pc < g.K; pc += ks.KC) {
      const int64_t kc = std::min(ks.KC, g.K - pc);
      GemmArgs<T> a = g;
      a.K = kc;
      a.packed_A = panels;
      a.packed_B = panels + Mr * kc;
      pack_all(true, g.M, kc, g.A + pc * g.csA, g.rsA, g.csA, const_cast<T*>(a.packed_A));
      pack_all(false, g.N, kc, g.B + pc * g.rsB, g.csB, g.rsB, const_cast<T*>(a.packed_B));
      if (pc > 0) { a.accumulate = true; a.bias_m = nullptr; a.bias_n = nullptr; }
      at::parallel_for(0, tm * tn, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) run(a, true, true, t);
      });
    }
    return;
  }
  at::parallel_for(0, tm * tn, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) run(g, packA, packB, t);
  });
}

}  // namespace
}  // namespace gemm_detail

void gemm(const GemmArgs<float>& a) { gemm_detail::gemm_impl(a); }
void gemm(const GemmArgs<double>& a) { gemm_detail::gemm_impl(a); }

template <typename T>
int64_t gemm_packed_a_size(int64_t M, int64_t K, Isa isa) {
  const auto ks = gemm_detail::kernels(isa, static_cast<T*>(nullptr));
  return gemm_detail::round_up(M, ks.MR) * K;
}
template <typename T>
int64_t gemm_packed_b_size(int64_t K, int64_t N) {
  const auto ks = gemm_detail::kernels(gemm_isa(), static_cast<T*>(nullptr));
  return gemm_detail::round_up(N, ks.NR) * K;
}
template <typename T>
PackedBLayout gemm_packed_b_layout(int64_t K) {
  const auto ks = gemm_detail::kernels(gemm_isa(), static_cast<T*>(nullptr));
  return {gemm_detail::kc_for(ks.KC, K), ks.NR};
}
template <typename T>
void gemm_fill_b_row(const SliverFill* f, int64_t n, const T* x, int64_t limit, T* row,
                     int64_t sl, int64_t R) {
  const auto ks = gemm_detail::kernels(gemm_isa(), static_cast<T*>(nullptr));
  TORCH_CHECK(R == ks.NR, "fastlayers: the CPU kernel path changed during a convolution");
  if (ks.fill_b_row) return ks.fill_b_row(f, n, x, limit, row, sl, ks.NR);
  for (int64_t i = 0; i < n; ++i) {  // the reference the vector kernels match
    T* d = row + f[i].sliver * sl;
    if (i == 0 || f[i - 1].last)
      for (int j = 0; j < ks.NR; ++j) d[j] = T(0);
    for (int j = f[i].l0; j < f[i].l1; ++j) d[j] = x[f[i].src + (j - f[i].l0)];
  }
}
template <typename T>
void gemm_transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
  const auto ks = gemm_detail::kernels(gemm_isa(), static_cast<T*>(nullptr));
  if (ks.transpose) return ks.transpose(rows, cols, src, lds, dst, ldd);
  constexpr int64_t kB = 32;  // the reference: 32 x 32 blocks
  for (int64_t i0 = 0; i0 < rows; i0 += kB)
    for (int64_t j0 = 0; j0 < cols; j0 += kB)
      for (int64_t i = i0; i < std::min(rows, i0 + kB); ++i)
        for (int64_t j = j0; j < std::min(cols, j0 + kB); ++j) dst[j * ldd + i] = src[i * lds + j];
}
template <typename T>
ImplicitPath gemm_implicit_path(int64_t n) {
  using gemm_detail::kernels;
  using gemm_detail::round_up;
  const Isa isa = gemm_isa();
  const int64_t R = kernels(isa, static_cast<T*>(nullptr)).NR;
  if (isa == Isa::Avx512) {
    const int64_t R2 = kernels(Isa::Avx2, static_cast<T*>(nullptr)).NR;
    if (round_up(n, R2) < round_up(n, R)) return {Isa::Avx2, R2};
  }
  return {isa, R};
}
// Per R-lane sliver of C's columns and per KC block of K, every MR-row tile
// (accumulating in C, or in a temporary tile per row tile at the edges), so
// the block's B rows of the sliver stay in L1 while the packed A streams from
// L2, as in gemm_block's jr / ir loops.
template <typename T>
void gemm_implicit_b(const ImplicitB<T>& g) {
  using namespace gemm_detail;
  KernelSet<T> ks = kernels(g.isa, static_cast<T*>(nullptr));
  TORCH_CHECK(ks.indirect_b && g.R == ks.NR, "fastlayers: implicit GEMM with R = ", g.R,
              " on a kernel path with ", ks.NR, "-lane slivers");
  ks.KC = kc_for(ks.KC, g.K);  // the blocks gemm_pack_a packed A in
  const int MR = ks.MR, NR = ks.NR;
  const int64_t Mr = round_up(g.M, MR);
  T* const ctiles = scratch<T>(2, Mr * NR);  // (gemm_block's slot: not used meanwhile)
  const int64_t rs = g.c_trans ? 1 : g.ldc, cs = g.c_trans ? g.ldc : 1;
  for (int64_t j0 = 0; j0 < g.n; j0 += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, g.n - j0));
    for (int64_t pc = 0; pc < g.K; pc += ks.KC) {
      const int64_t kc = std::min(ks.KC, g.K - pc);
      for (int64_t i0 = 0; i0 < g.M; i0 += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, g.M - i0));
        const bool full = mr == MR && nr == NR && (!g.c_trans || ks.store_t);
        T* const c = g.C + i0 * rs + j0 * cs;
        T* const ct = ctiles + i0 * NR;
        Tile<T> t;
        t.B = g.x + j0; t.b_ks = 0;
        t.C = full ? c : ct; t.ldc = full ? g.ldc : NR;
        t.c_trans = full && g.c_trans;
        t.bias_n = nullptr;
        t.kc = kc;
        t.A = g.packed_A + pc * Mr + i0 * kc; t.a_rs = 1; t.a_ks = MR;
        t.b_off = g.k_off + pc;
        t.beta = pc > 0;
        t.bias_m = pc == 0 && full && g.bias_m ? g.bias_m + i0 : nullptr;
        ks.indirect_b(t);
        if (full || pc + ks.KC < g.K) continue;
        for (int r = 0; r < mr; ++r) {
          const T bm = g.bias_m ? g.bias_m[i0 + r] : T(0);
          for (int j = 0; j < nr; ++j) c[r * rs + j * cs] = ct[r * NR + j] + bm;
        }
      }
    }
  }
}
template <typename T>
void gemm_pack_a(int64_t M, int64_t K, const T* A, int64_t rsA, int64_t csA, T* dst, Isa isa) {
  gemm_detail::pack_all(true, M, K, A, rsA, csA, dst, isa);
}
template <typename T>
void gemm_pack_b(int64_t K, int64_t N, const T* B, int64_t rsB, int64_t csB, T* dst) {
  gemm_detail::pack_all(false, N, K, B, csB, rsB, dst);
}
template int64_t gemm_packed_a_size<float>(int64_t, int64_t, Isa);
template int64_t gemm_packed_a_size<double>(int64_t, int64_t, Isa);
template int64_t gemm_packed_b_size<float>(int64_t, int64_t);
template int64_t gemm_packed_b_size<double>(int64_t, int64_t);
template PackedBLayout gemm_packed_b_layout<float>(int64_t);
template PackedBLayout gemm_packed_b_layout<double>(int64_t);
template void gemm_fill_b_row<float>(const SliverFill*, int64_t, const float*, int64_t, float*,
                                     int64_t, int64_t);
template void gemm_fill_b_row<double>(const SliverFill*, int64_t, const double*, int64_t,
                                      double*, int64_t, int64_t);
template void gemm_transpose<float>(int64_t, int64_t, const float*, int64_t, float*, int64_t);
template void gemm_transpose<double>(int64_t, int64_t, const double*, int64_t, double*, int64_t);
template ImplicitPath gemm_implicit_path<float>(int64_t);
template ImplicitPath gemm_implicit_path<double>(int64_t);
template void gemm_implicit_b<float>(const ImplicitB<float>&);
template void gemm_implicit_b<double>(const ImplicitB<double>&);
template void gemm_pack_a<float>(int64_t, int64_t, const float*, int64_t, int64_t, float*, Isa);
template void gemm_pack_a<double>(int64_t, int64_t, const double*, int64_t, int64_t, double*, Isa);
template void gemm_pack_b<float>(int64_t, int64_t, const float*, int64_t, int64_t, float*);
template void gemm_pack_b<double>(int64_t, int64_t, const double*, int64_t, int64_t, double*);

}  // namespace fastlayers::cpu

// ---------------------------------------------------------------------------
// Test hook: torch.ops.fastlayers_internal.gemm_(a, b, c, accumulate, bias_m,
// bias_n) runs the GEMM core on tensors with whatever strides they have,
// writing into c (so tests reach accumulate, bias_m and any C layout, which
// Linear does not use but Conv2d does).
namespace fastlayers::cpu {
namespace {

void gemm_test_op(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool accumulate,
                  const std::optional<at::Tensor>& bias_m,
                  const std::optional<at::Tensor>& bias_n, int64_t prepack) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm_: expected 2-D tensors");
  TORCH_CHECK(a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1),
              "gemm_: shape mismatch");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == c.scalar_type(),
              "gemm_: dtype mismatch");
  const bool has_m = bias_m.has_value() && bias_m->defined();
  const bool has_n = bias_n.has_value() && bias_n->defined();
  at::Tensor bm = has_m ? bias_m->contiguous() : at::Tensor();
  at::Tensor bn = has_n ? bias_n->contiguous() : at::Tensor();
  TORCH_CHECK(!has_m || bm.numel() == c.size(0), "gemm_: bias_m must have M elements");
  TORCH_CHECK(!has_n || bn.numel() == c.size(1), "gemm_: bias_n must have N elements");
  TORCH_CHECK(prepack >= 0 && prepack <= 3, "gemm_: prepack must be 0..3");
  TORCH_CHECK(prepack == 0 || (c.size(1) <= 1 || c.stride(1) == 1),
              "gemm_: prepacked operands need a row-major C");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastlayers_gemm_test", [&] {
    GemmArgs<scalar_t> g;
    g.M = c.size(0); g.N = c.size(1); g.K = a.size(1);
    g.A = a.const_data_ptr<scalar_t>(); g.rsA = a.stride(0); g.csA = a.stride(1);
    g.B = b.const_data_ptr<scalar_t>(); g.rsB = b.stride(0); g.csB = b.stride(1);
    g.C = c.data_ptr<scalar_t>(); g.rsC = c.stride(0); g.csC = c.stride(1);
    g.accumulate = accumulate;
    g.bias_m = has_m ? bm.const_data_ptr<scalar_t>() : nullptr;
    g.bias_n = has_n ? bn.const_data_ptr<scalar_t>() : nullptr;
    // prepack: bit 0 packs A, bit 1 packs B beforehand (gemm_pack_a / _b).
    std::vector<scalar_t> pa, pb;
    if (prepack & 1) {
      pa.resize(gemm_packed_a_size<scalar_t>(g.M, g.K));
      gemm_pack_a<scalar_t>(g.M, g.K, g.A, g.rsA, g.csA, pa.data());
      g.packed_A = pa.data();
      g.A = nullptr;
    }
    if (prepack & 2) {
      pb.resize(gemm_packed_b_size<scalar_t>(g.K, g.N));
      gemm_pack_b<scalar_t>(g.K, g.N, g.B, g.rsB, g.csB, pb.data());
      g.packed_B = pb.data();
      g.B = nullptr;
    }
    gemm(g);
  });
}

}  // namespace
}  // namespace fastlayers::cpu

TORCH_LIBRARY(fastlayers_internal, m) {
  m.def("gemm_(Tensor a, Tensor b, Tensor(c!) c, bool accumulate, Tensor? bias_m, Tensor? bias_n,"
        " int prepack=0) -> ()");
  m.impl("gemm_", c10::DispatchKey::CPU, &fastlayers::cpu::gemm_test_op);
}
