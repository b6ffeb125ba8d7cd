// Tiled GEMM kernels shared by gemm.cu (plain strided matrices) and conv2d.cu
// (implicit GEMM: the operands are gathered on the fly, nothing materialised).
//
// A kernel computes, for every group g, C_g[M x N] = A_g[M x K] . B_g[K x N].
// The operands are described by a "problem" struct P with
//   using T;                   storage type (float, double, __half, __nv_bfloat16)
//   int64_t M, N, K;
//   bool a_k_fast, b_k_fast;   whether neighbouring k are closest in memory
//                              (picks the thread -> element mapping of tile
//                              loads, for coalescing; correctness never
//                              depends on it)
//   T a(int g, int64_t i, int64_t k) const;   element of A (zero outside)
//   T b(int g, int64_t k, int64_t j) const;   element of B
//   void store(int g, int64_t i, int64_t j, Acc v) const;   epilogue
// Both kernels stage BM x BK and BK x BN tiles in shared memory (double
// buffered: the next tile is fetched into registers while the current one is
// multiplied).
//  * gemm_simt_kernel (float/double): 256 threads as a 16 x 16 grid; thread
//    (ty, tx) owns rows ty + 16 i and columns tx + 16 j (register blocking
//    TM x TN), so shared-memory reads are conflict-free and stores coalesce.
//  * gemm_wmma_kernel (half/bfloat16): tensor cores through WMMA 16x16x16,
//    fp32 accumulation; 8 warps as 2 x 4, each warp a 64 x 32 block of C.
// Split-K: blockIdx.z = g * splits + split. With splits > 1 each block writes
// its partial C (in Acc) to a workspace and gemm_splitk_reduce sums the
// splits in a fixed order, then runs the epilogue: deterministic.
#pragma once
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace fastlayers::cuda {

constexpr int kGemmThreads = 256;

template <class P, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__(kGemmThreads)
gemm_simt_kernel(P p, typename Num<typename P::T>::Acc* ws, int splits, int64_t kchunk) {
  using T = typename P::T;
  using Acc = typename Num<T>::Acc;
  static_assert(BM == 16 * TM && BN == 16 * TN, "16 x 16 thread grid");
  constexpr int AE = BM * BK / kGemmThreads;
  constexpr int BE = BK * BN / kGemmThreads;
  static_assert(AE * kGemmThreads == BM * BK && BE * kGemmThreads == BK * BN, "tile split");
  constexpr int PAD = 4;
  __shared__ T As[2][BK][BM + PAD];
  __shared__ T Bs[2][BK][BN + PAD];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int zg = blockIdx.z, g = zg / splits, sp = zg % splits;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const int64_t kbeg = int64_t(sp) * kchunk;
  const int64_t kend = kbeg + kchunk < p.K ? kbeg + kchunk : p.K;
  const int64_t ntiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;

  T ra[AE], rb[BE];
  auto a_pos = [&](int r, int& ml, int& kl) {
    const int e = tid + r * kGemmThreads;
    if (p.a_k_fast) { kl = e % BK; ml = e / BK; } else { ml = e % BM; kl = e / BM; }
  };
  auto b_pos = [&](int r, int& kl, int& nl) {
    const int e = tid + r * kGemmThreads;
    if (p.b_k_fast) { kl = e % BK; nl = e / BK; } else { nl = e % BN; kl = e / BN; }
  };
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int r = 0; r < AE; ++r) {
      int ml, kl; a_pos(r, ml, kl);
      const int64_t gm = m0 + ml, gk = k0 + kl;
      ra[r] = (gm < p.M && gk < kend) ? p.a(g, gm, gk) : zero_of<T>();
    }
#pragma unroll
    for (int r = 0; r < BE; ++r) {
      int kl, nl; b_pos(r, kl, nl);
      const int64_t gn = n0 + nl, gk = k0 + kl;
      rb[r] = (gn < p.N && gk < kend) ? p.b(g, gk, gn) : zero_of<T>();
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int r = 0; r < AE; ++r) { int ml, kl; a_pos(r, ml, kl); As[buf][kl][ml] = ra[r]; }
#pragma unroll
    for (int r = 0; r < BE; ++r) { int kl, nl; b_pos(r, kl, nl); Bs[buf][kl][nl] = rb[r]; }
  };

  Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

  if (ntiles > 0) { fetch(kbeg); stash(0); }
  __syncthreads();
  for (int64_t t = 0; t < ntiles; ++t) {
    const int buf = int(t & 1);
    if (t + 1 < ntiles) fetch(kbeg + (t + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = Num<T>::to_acc(As[buf][kk][ty + 16 * i]);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Num<T>::to_acc(Bs[buf][kk][tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    if (t + 1 < ntiles) stash(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= p.M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn >= p.N) continue;
      if (splits > 1) ws[(int64_t(zg) * p.M + gm) * p.N + gn] = acc[i][j];
      else p.store(g, gm, gn, acc[i][j]);
    }
  }
}

constexpr int kWmmaBM = 128, kWmmaBN = 128, kWmmaBK = 16;

template <class P>
__global__ void __launch_bounds__(kGemmThreads)
gemm_wmma_kernel(P p, float* ws, int splits, int64_t kchunk) {
  using namespace nvcuda;
  using T = typename P::T;
  constexpr int BM = kWmmaBM, BN = kWmmaBN, BK = kWmmaBK;
  constexpr int LDA = BK + 8, LDB = BN + 8;   // multiples of 8 (16 bytes), as WMMA needs
  constexpr int AE = BM * BK / kGemmThreads, BE = BK * BN / kGemmThreads;
  __shared__ __align__(32) T As[2][BM][LDA];
  __shared__ __align__(32) T Bs[2][BK][LDB];
  __shared__ __align__(32) float Cs[kGemmThreads / 32][16 * 16];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;     // warp block: rows wm*64, columns wn*32
  const int zg = blockIdx.z, g = zg / splits, sp = zg % splits;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const int64_t kbeg = int64_t(sp) * kchunk;
  const int64_t kend = kbeg + kchunk < p.K ? kbeg + kchunk : p.K;
  const int64_t ntiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;

  T ra[AE], rb[BE];
  auto a_pos = [&](int r, int& ml, int& kl) {
    const int e = tid + r * kGemmThreads;
    if (p.a_k_fast) { kl = e % BK; ml = e / BK; } else { ml = e % BM; kl = e / BM; }
  };
  auto b_pos = [&](int r, int& kl, int& nl) {
    const int e = tid + r * kGemmThreads;
    if (p.b_k_fast) { kl = e % BK; nl = e / BK; } else { nl = e % BN; kl = e / BN; }
  };
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int r = 0; r < AE; ++r) {
      int ml, kl; a_pos(r, ml, kl);
      const int64_t gm = m0 + ml, gk = k0 + kl;
      ra[r] = (gm < p.M && gk < kend) ? p.a(g, gm, gk) : zero_of<T>();
    }
#pragma unroll
    for (int r = 0; r < BE; ++r) {
      int kl, nl; b_pos(r, kl, nl);
      const int64_t gn = n0 + nl, gk = k0 + kl;
      rb[r] = (gn < p.N && gk < kend) ? p.b(g, gk, gn) : zero_of<T>();
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int r = 0; r < AE; ++r) { int ml, kl; a_pos(r, ml, kl); As[buf][ml][kl] = ra[r]; }
#pragma unroll
    for (int r = 0; r < BE; ++r) { int kl, nl; b_pos(r, kl, nl); Bs[buf][kl][nl] = rb[r]; }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  if (ntiles > 0) { fetch(kbeg); stash(0); }
  __syncthreads();
  for (int64_t t = 0; t < ntiles; ++t) {
    const int buf = int(t & 1);
    if (t + 1 < ntiles) fetch(kbeg + (t + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        wmma::load_matrix_sync(fa[i], &As[buf][wm * 64 + i * 16][kk], LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], &Bs[buf][kk][wn * 32 + j * 16], LDB);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    if (t + 1 < ntiles) stash(buf ^ 1);
    __syncthreads();
  }

  // Epilogue: each 16 x 16 accumulator goes through this warp's staging tile.
  float* cs = Cs[warp];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(cs, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t gm = m0 + wm * 64 + i * 16 + e / 16;
        const int64_t gn = n0 + wn * 32 + j * 16 + e % 16;
        if (gm < p.M && gn < p.N) {
          if (splits > 1) ws[(int64_t(zg) * p.M + gm) * p.N + gn] = cs[e];
          else p.store(g, gm, gn, cs[e]);
        }
      }
      __syncwarp();
    }
  }
}

// Sums the split-K partials of every (g, i, j) in split order, then the epilogue.
template <class P>
__global__ void gemm_splitk_reduce(P p, const typename Num<typename P::T>::Acc* ws,
                                   int64_t groups, int splits) {
  using Acc = typename Num<typename P::T>::Acc;
  const int64_t mn = p.M * p.N, total = groups * mn;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < total;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g = q / mn, r = q - g * mn, i = r / p.N, j = r - i * p.N;
    const Acc* w = ws + g * splits * mn + r;
    Acc s = Acc(0);
    for (int k = 0; k < splits; ++k) s += w[int64_t(k) * mn];
    p.store(int(g), i, j, s);
  }
}

// ---- planning and launch -------------------------------------------------------

struct GemmPlan {
  int cfg = 0;            // 0: SIMT 64x64, 1: SIMT 128x128, 2: WMMA 128x128
  int64_t BM = 64, BN = 64, BK = 8;
  int splits = 1;
  int64_t kchunk = 0;
  int64_t ws_bytes = 0;
};

// Depends only on the shape and dtype, so the split (hence the summation
// order) is the same on every run.
inline GemmPlan plan_gemm(int64_t M, int64_t N, int64_t K, int64_t groups, DType dt) {
  GemmPlan pl;
  const bool tc = dt == DType::F16 || dt == DType::BF16;
  if (tc) {
    pl.cfg = 2; pl.BM = kWmmaBM; pl.BN = kWmmaBN; pl.BK = kWmmaBK;
  } else if (dt == DType::F32 && M >= 128 && N >= 128 &&
             ceil_div(M, 128) * ceil_div(N, 128) * groups >= 264) {
    pl.cfg = 1; pl.BM = 128; pl.BN = 128; pl.BK = 8;
  }
  const int64_t tiles = ceil_div(M, pl.BM) * ceil_div(N, pl.BN) * groups;
  const int64_t acc_size = dt == DType::F64 ? 8 : 4;
  int64_t splits = 1;
  if (tiles < 264 && K >= 2048) {
    splits = ceil_div(528, tiles);
    if (splits > K / 1024) splits = K / 1024;
    if (splits > 64) splits = 64;
    while (splits > 1 && (groups * splits > 65535 ||
                          groups * splits * M * N * acc_size > (int64_t(1) << 28)))
      --splits;
    if (splits < 1) splits = 1;
  }
  pl.kchunk = ceil_div(ceil_div(K, splits), pl.BK) * pl.BK;
  if (pl.kchunk < 1) pl.kchunk = pl.BK;
  pl.splits = int(ceil_div(K, pl.kchunk));
  if (pl.splits < 1) pl.splits = 1;
  pl.ws_bytes = pl.splits > 1 ? groups * pl.splits * M * N * acc_size : 0;
  return pl;
}

// Launches problem p (groups copies). workspace: plan.ws_bytes bytes.
template <class P>
int run_gemm(const P& p, int64_t groups, DType dt, void* workspace, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0 || groups <= 0) return 0;
  const GemmPlan pl = plan_gemm(p.M, p.N, p.K, groups, dt);
  using Acc = typename Num<typename P::T>::Acc;
  if (pl.splits > 1 && workspace == nullptr) return int(cudaErrorInvalidValue);
  Acc* ws = pl.splits > 1 ? static_cast<Acc*>(workspace) : nullptr;
  const int64_t gy = ceil_div(p.M, pl.BM), gx = ceil_div(p.N, pl.BN), gz = groups * pl.splits;
  if (gy > 65535 || gz > 65535 || gx > 2147483647LL) return int(cudaErrorInvalidConfiguration);
  const dim3 grid{unsigned(gx), unsigned(gy), unsigned(gz)};
  if constexpr (std::is_same_v<typename P::T, float>) {
    if (pl.cfg == 1)
      gemm_simt_kernel<P, 128, 128, 8, 8, 8><<<grid, kGemmThreads, 0, stream>>>(p, ws, pl.splits, pl.kchunk);
    else
      gemm_simt_kernel<P, 64, 64, 8, 4, 4><<<grid, kGemmThreads, 0, stream>>>(p, ws, pl.splits, pl.kchunk);
  } else if constexpr (std::is_same_v<typename P::T, double>) {
    gemm_simt_kernel<P, 64, 64, 8, 4, 4><<<grid, kGemmThreads, 0, stream>>>(p, ws, pl.splits, pl.kchunk);
  } else {
    gemm_wmma_kernel<P><<<grid, kGemmThreads, 0, stream>>>(p, ws, pl.splits, pl.kchunk);
  }
  int err = last_error();
  if (err) return err;
  if (pl.splits > 1) {
    gemm_splitk_reduce<P><<<grid_for(groups * p.M * p.N, 256), 256, 0, stream>>>(p, ws, groups, pl.splits);
    err = last_error();
  }
  return err;
}

template <class P>
int64_t gemm_ws_bytes(const P& p, int64_t groups, DType dt) {
  if (p.M <= 0 || p.N <= 0 || groups <= 0) return 0;
  return plan_gemm(p.M, p.N, p.K, groups, dt).ws_bytes;
}

}  // namespace fastlayers::cuda
