// Tiled GEMM kernels shared by gemm.cu (plain strided matrices) and conv2d*.cu
// (implicit GEMM: the operands are gathered on the fly, nothing materialised).
//
// A kernel computes, for every group g, C_g[M x N] = A_g[M x K] . B_g[K x N].
// A problem struct P describes the operands and the epilogue:
//   using T; using AOp; using BOp;   storage type and the two operand types
//   int64_t M, N, K;
//   bool a_k_fast, b_k_fast;         whether neighbouring k are closest in memory
//                                    (picks the thread -> element map of tile loads,
//                                    for coalescing; correctness never depends on it)
//   AOp a_op(int g); BOp b_op(int g);
//   T* c; bool accumulate; const T* bias_m (index g*M + i); const T* bias_n (index j);
//   int64_t c_row(int g, int64_t i), c_col(int g, int64_t j): C element offset = sum.
//   static constexpr bool kBigTiles: whether the float32 128x128 / 64x128 tiles are
//                                    instantiated (else 64x64 only: rare wide-index
//                                    variants stay cheap to compile);
//   static constexpr bool kLightOperands: operand rows cost few registers (plain
//                                    matrices), so register-capped big tiles are worth it.
// An operand ("Op") splits the address of element (mn, k) into a part that
// depends only on mn (a row of A / a column of B) and a part that depends only
// on k, so each thread decodes its few rows once and one k per tile:
//   struct Mn; struct Kx;  Mn mn(int64_t); Kx k(int64_t);
//   T load(const Mn&, const Kx&)     the element, or zero where it is padding.
// A plain matrix is offset(mn) + offset(k); a convolution input is
// x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] = (n, p, q) part + (c, r, s) part,
// zero when the row/column sum falls outside the image.
//
//  * gemm_simt_kernel (float/double): BM x BN x 16 tiles, 256 threads as a 16 x 16
//    grid (a warp is a 4 x 8 patch of it); thread (ty, tx) owns rows ty*4 + 64*ii + {0..3} and columns
//    tx*4 + 64*jj + {0..3} (a TM x TN register block read from shared memory as
//    4-wide vectors). Tiles are double buffered: the next tile is fetched into
//    registers while the current one is multiplied.
//  * gemm_wmma_kernel (half/bfloat16 fallback): tensor cores through WMMA 16x16x16,
//    fp32 accumulation; 8 warps as 2 x 4, each a 64 x 32 block of C.
// Split-K: blockIdx.z = g * splits + split. With splits > 1 each block writes
// its partial C (in Acc) to a workspace and gemm_splitk_reduce sums the
// splits in a fixed order, then runs the epilogue: deterministic.
#pragma once
#include <mma.h>

#include <cstdlib>
#include <type_traits>

#include "common.cuh"

namespace fastlayers::cuda {

constexpr int kGemmThreads = 256;

// ---- operands ---------------------------------------------------------------------

// Plain strided matrix: element (mn, k) at p[mn * smn + k * sk].
template <typename Tt>
struct MatOp {
  using T = Tt;
  const Tt* p; int64_t smn, sk;
  struct Mn { int64_t o; };
  struct Kx { int64_t o; };
  FL_HD Mn mn(int64_t i) const { return {i * smn}; }
  FL_HD Kx k(int64_t k) const { return {k * sk}; }
  FL_HD Tt load(const Mn& a, const Kx& b) const { return p[a.o + b.o]; }
};

// Element (i, k) of A or (k, j) of B, one at a time (WMMA fallback, host checks).
template <class P>
FL_HD typename P::T elem_a(const P& p, int g, int64_t i, int64_t k) {
  const auto op = p.a_op(g);
  return op.load(op.mn(i), op.k(k));
}
template <class P>
FL_HD typename P::T elem_b(const P& p, int g, int64_t k, int64_t j) {
  const auto op = p.b_op(g);
  return op.load(op.mn(j), op.k(k));
}

// The epilogue: C[o] = (accumulate ? C[o] : 0) + v + bias_m[g*M + i] + bias_n[j].
template <class P>
FL_HD void store_c_at(const P& p, int g, int64_t i, int64_t j, int64_t o,
                      typename Num<typename P::T>::Acc v) {
  using T = typename P::T;
  if (p.bias_m) v += Num<T>::to_acc(p.bias_m[int64_t(g) * p.M + i]);
  if (p.bias_n) v += Num<T>::to_acc(p.bias_n[j]);
  if (p.accumulate) v += Num<T>::to_acc(p.c[o]);
  p.c[o] = Num<T>::from_acc(v);
}
template <class P>
FL_HD void store_c(const P& p, int g, int64_t i, int64_t j, typename Num<typename P::T>::Acc v) {
  store_c_at(p, g, i, j, p.c_row(g, i) + p.c_col(g, j), v);
}

// ---- SIMT kernel (float / double) -------------------------------------------------

constexpr int kSimtBK = 16, kSimtPad = 4;

// Loads this thread's elements of an operand tile (32*EM rows/columns x 8*KH k)
// into registers, then stores them into the shared tile s[k][mn] (leading
// dimension ld). k-fast map: 8 threads per row/column read 8 neighbouring k
// (32 bytes for float); mn-fast map: a warp reads 32 neighbouring
// rows/columns at one k. Element (em, kh) of the thread is mn = mnl0 + 32 em,
// k = kl + 8 kh; each k is decoded once per tile.
template <class Op, int EM, int KH>
struct TileLoader {
  using T = typename Op::T;
  typename Op::Mn mi[EM];
  bool mv[EM];
  int mnl0, kl;
  T r[KH][EM];
  FL_HD void init(const Op& op, int64_t mn0, int64_t MN, bool kfast, int tid) {
    kl = kfast ? tid % 8 : tid / 32;
    mnl0 = kfast ? tid / 8 : tid % 32;
FL_UNROLL
    for (int e = 0; e < EM; ++e) {
      const int64_t m = mn0 + mnl0 + 32 * e;
      mv[e] = m < MN;
      mi[e] = op.mn(mv[e] ? m : mn0);
    }
  }
  FL_HD void load(const Op& op, int64_t k0, int64_t kend) {
FL_UNROLL
    for (int h = 0; h < KH; ++h) {
      const int64_t k = k0 + kl + 8 * h;
      if (k < kend) {
        const typename Op::Kx kx = op.k(k);
FL_UNROLL
        for (int e = 0; e < EM; ++e) r[h][e] = mv[e] ? op.load(mi[e], kx) : zero_of<T>();
      } else {
FL_UNROLL
        for (int e = 0; e < EM; ++e) r[h][e] = zero_of<T>();
      }
    }
  }
  FL_HD void store(T* s, int ld) const {
FL_UNROLL
    for (int h = 0; h < KH; ++h)
FL_UNROLL
      for (int e = 0; e < EM; ++e) s[(kl + 8 * h) * ld + mnl0 + 32 * e] = r[h][e];
  }
};

// Thread -> (ty, tx) of the 16 x 16 grid: a warp covers 4 x 8 of it, so its
// shared-memory reads of A touch 4 and of B 8 distinct 16-byte vectors.
FL_HD __forceinline__ void simt_thread(int tid, int& ty, int& tx) {
  const int warp = tid / 32, lane = tid % 32;
  ty = (warp / 2) * 4 + lane / 8;
  tx = (warp % 2) * 8 + lane % 8;
}

// Four neighbouring shared-memory values (16-byte aligned for float) as Acc.
template <typename T, typename Acc>
__device__ __forceinline__ void lds4(const T* s, Acc* out) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(s);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = Num<T>::to_acc(s[i]);
  }
}

// Rows/columns of the register block: thread coordinate t (ty or tx) owns
// t*4 + 64*blk + i, i < 4.
FL_HD __forceinline__ int simt_local(int t, int idx) { return t * 4 + 64 * (idx / 4) + idx % 4; }

// MINB: blocks per SM the register allocation must allow (2 caps it at 128).
template <class P, int BM, int BN, int MINB>
__global__ void __launch_bounds__(kGemmThreads, MINB)
gemm_simt_kernel(P p, typename Num<typename P::T>::Acc* ws, int splits, int64_t kchunk) {
  using T = typename P::T;
  using Acc = typename Num<T>::Acc;
  constexpr int BK = kSimtBK, LDA = BM + kSimtPad, LDB = BN + kSimtPad;
  constexpr int TM = BM / 16, TN = BN / 16, EA = BM / 32, EB = BN / 32, KH = BK / 8;
  static_assert(BM % 64 == 0 && BN % 64 == 0 && BK % 8 == 0, "tile shape");
  __shared__ __align__(16) T As[2][BK * LDA];
  __shared__ __align__(16) T Bs[2][BK * LDB];

  const int tid = threadIdx.x;
  int ty, tx;
  simt_thread(tid, ty, tx);
  const int zg = blockIdx.z, g = zg / splits, sp = zg % splits;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const int64_t kbeg = int64_t(sp) * kchunk;
  const int64_t kend = kbeg + kchunk < p.K ? kbeg + kchunk : p.K;
  const int64_t ntiles = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;

  const auto aop = p.a_op(g);
  const auto bop = p.b_op(g);
  TileLoader<std::remove_const_t<decltype(aop)>, EA, KH> la;
  TileLoader<std::remove_const_t<decltype(bop)>, EB, KH> lb;
  la.init(aop, m0, p.M, p.a_k_fast, tid);
  lb.init(bop, n0, p.N, p.b_k_fast, tid);

  Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

  if (ntiles > 0) {
    la.load(aop, kbeg, kend); lb.load(bop, kbeg, kend);
    la.store(As[0], LDA); lb.store(Bs[0], LDB);
  }
  __syncthreads();
  for (int64_t t = 0; t < ntiles; ++t) {
    const int buf = int(t & 1);
    if (t + 1 < ntiles) {
      la.load(aop, kbeg + (t + 1) * BK, kend);
      lb.load(bop, kbeg + (t + 1) * BK, kend);
    }
    const T* as = As[buf];
    const T* bs = Bs[buf];
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 4) lds4(as + kk * LDA + ty * 4 + 16 * i, a + i);
#pragma unroll
      for (int j = 0; j < TN; j += 4) lds4(bs + kk * LDB + tx * 4 + 16 * j, b + j);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    if (t + 1 < ntiles) { la.store(As[buf ^ 1], LDA); lb.store(Bs[buf ^ 1], LDB); }
    __syncthreads();
  }

  // Epilogue: row and column offsets decoded once per thread.
  int64_t co[TN];
#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int64_t gn = n0 + simt_local(tx, j);
    co[j] = (splits == 1 && gn < p.N) ? p.c_col(g, gn) : 0;
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t gm = m0 + simt_local(ty, i);
    if (gm >= p.M) continue;
    const int64_t ro = splits == 1 ? p.c_row(g, gm) : 0;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t gn = n0 + simt_local(tx, j);
      if (gn >= p.N) continue;
      if (splits > 1) ws[(int64_t(zg) * p.M + gm) * p.N + gn] = acc[i][j];
      else store_c_at(p, g, gm, gn, ro + co[j], acc[i][j]);
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
      ra[r] = (gm < p.M && gk < kend) ? elem_a(p, g, gm, gk) : zero_of<T>();
    }
#pragma unroll
    for (int r = 0; r < BE; ++r) {
      int kl, nl; b_pos(r, kl, nl);
      const int64_t gn = n0 + nl, gk = k0 + kl;
      rb[r] = (gn < p.N && gk < kend) ? elem_b(p, g, gk, gn) : zero_of<T>();
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
          else store_c(p, g, gm, gn, cs[e]);
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
    store_c(p, int(g), i, j, s);
  }
}

// ---- planning and launch -------------------------------------------------------

struct GemmPlan {
  int cfg = 0;            // 0: SIMT 64x64, 1: SIMT 128x128, 2: WMMA 128x128, 3: SIMT 64x128
  int64_t BM = 64, BN = 64, BK = kSimtBK;
  int splits = 1;
  int64_t kchunk = 0;
  int64_t ws_bytes = 0;
};

constexpr int64_t kWave = 132;   // thread blocks that fill an H100/H200 once (1 per SM)

// Depends only on the shape and dtype, so the split (hence the summation
// order) is the same on every run.
inline GemmPlan plan_gemm(int64_t M, int64_t N, int64_t K, int64_t groups, DType dt,
                          bool big_tiles = true) {
  GemmPlan pl;
  const bool tc = dt == DType::F16 || dt == DType::BF16;
  auto tiles_of = [&](int64_t bm, int64_t bn) { return ceil_div(M, bm) * ceil_div(N, bn) * groups; };
  if (tc) {
    pl.cfg = 2; pl.BM = kWmmaBM; pl.BN = kWmmaBN; pl.BK = kWmmaBK;
  } else if (!big_tiles) {
  } else if (dt == DType::F32 && M > 96 && N > 96 && tiles_of(128, 128) >= kWave) {
    pl.cfg = 1; pl.BM = 128; pl.BN = 128;
  } else if (dt == DType::F32 && N > 96 &&
             (tiles_of(64, 128) >= kWave ||
              (tiles_of(64, 64) < kWave && K >= 1024 &&
               tiles_of(64, 128) * (K / 256 < 64 ? K / 256 : 64) >= kWave))) {
    // 64x128 also when the split along K below still fills the GPU with them
    // (the split count is capped at K / 256 and 64): conv wgrad 32x64x56x56
    // k3 -> 64 (M 64, N 576, K 100352) ran 0.407 ms with 64x128 tiles against
    // 0.625 ms with 64x64, Linear 512x1024->1024 fwd+bwd 0.55x -> 0.72x torch
    // (H200, 2026-11-28).
    pl.cfg = 3; pl.BM = 64; pl.BN = 128;
  }
  // Benchmarking knob: FASTLAYERS_SIMT_CFG=0/1/3 forces a float32 tile config.
  if (dt == DType::F32 && big_tiles) {
    if (const char* e = std::getenv("FASTLAYERS_SIMT_CFG")) {
      const int c = std::atoi(e);
      if (c == 0 || c == 1 || c == 3) {
        pl.cfg = c; pl.BM = c == 1 ? 128 : 64; pl.BN = c == 0 ? 64 : 128;
      }
    }
  }
  const int64_t tiles = tiles_of(pl.BM, pl.BN);
  const int64_t acc_size = dt == DType::F64 ? 8 : 4;
  int64_t splits = 1;
  // Too few tiles to fill the GPU and a long reduction: split K (each split
  // keeps at least 256 k).
  if (tiles < kWave && K >= 1024) {
    splits = ceil_div(2 * kWave, tiles);
    if (splits > K / 256) splits = K / 256;
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

// Launches the split-K reduction when the plan splits K.
template <class P>
int finish_splitk(const P& p, const GemmPlan& pl, typename Num<typename P::T>::Acc* ws,
                  int64_t groups, cudaStream_t stream) {
  int err = last_error();
  if (err || pl.splits == 1) return err;
  gemm_splitk_reduce<P><<<grid_for(groups * p.M * p.N, 256), 256, 0, stream>>>(p, ws, groups, pl.splits);
  return last_error();
}

// One SIMT instantiation: prefers the largest shared-memory carveout (set once),
// so that two blocks of up to 34 KB fit on an SM, then launches.
template <class P, int BM, int BN, int MINB>
int launch_simt(const P& p, dim3 grid, typename Num<typename P::T>::Acc* ws, const GemmPlan& pl,
                int64_t groups, cudaStream_t stream) {
  static const int carveout = cudaFuncSetAttribute(
      gemm_simt_kernel<P, BM, BN, MINB>, cudaFuncAttributePreferredSharedMemoryCarveout,
      int(cudaSharedmemCarveoutMaxShared));
  (void)carveout;
  gemm_simt_kernel<P, BM, BN, MINB><<<grid, kGemmThreads, 0, stream>>>(p, ws, pl.splits, pl.kchunk);
  return finish_splitk(p, pl, ws, groups, stream);
}

// Launches problem p (groups copies). workspace: plan.ws_bytes bytes.
template <class P>
int run_gemm(const P& p, int64_t groups, DType dt, void* workspace, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0 || groups <= 0) return 0;
  const GemmPlan pl = plan_gemm(p.M, p.N, p.K, groups, dt, P::kBigTiles);
  using Acc = typename Num<typename P::T>::Acc;
  if (pl.splits > 1 && workspace == nullptr) return int(cudaErrorInvalidValue);
  Acc* ws = pl.splits > 1 ? static_cast<Acc*>(workspace) : nullptr;
  const int64_t gy = ceil_div(p.M, pl.BM), gx = ceil_div(p.N, pl.BN), gz = groups * pl.splits;
  if (gy > 65535 || gz > 65535 || gx > 2147483647LL) return int(cudaErrorInvalidConfiguration);
  const dim3 grid{unsigned(gx), unsigned(gy), unsigned(gz)};
  if constexpr (std::is_same_v<typename P::T, float>) {
    if constexpr (P::kBigTiles) {
      if (pl.cfg == 1) {
        // FASTLAYERS_SIMT_MINB=2 (benchmarking knob): the register-capped variant
        // (2 blocks per SM) for plain matrices, whose operands need few registers.
        if constexpr (P::kLightOperands) {
          const char* mb = std::getenv("FASTLAYERS_SIMT_MINB");
          if (mb && mb[0] == '2') return launch_simt<P, 128, 128, 2>(p, grid, ws, pl, groups, stream);
        }
        return launch_simt<P, 128, 128, 1>(p, grid, ws, pl, groups, stream);
      }
      if (pl.cfg == 3) return launch_simt<P, 64, 128, 2>(p, grid, ws, pl, groups, stream);
    }
    return launch_simt<P, 64, 64, 2>(p, grid, ws, pl, groups, stream);
  } else if constexpr (std::is_same_v<typename P::T, double>) {
    return launch_simt<P, 64, 64, 2>(p, grid, ws, pl, groups, stream);
  } else {
    gemm_wmma_kernel<P><<<grid, kGemmThreads, 0, stream>>>(p, ws, pl.splits, pl.kchunk);
  }
  return finish_splitk(p, pl, ws, groups, stream);
}

template <class P>
int64_t gemm_ws_bytes(const P& p, int64_t groups, DType dt) {
  if (p.M <= 0 || p.N <= 0 || groups <= 0) return 0;
  return plan_gemm(p.M, p.N, p.K, groups, dt, P::kBigTiles).ws_bytes;
}

}  // namespace fastlayers::cuda
