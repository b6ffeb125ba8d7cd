// Tensor-core GEMM for float16 / bfloat16 (sm_80+: Ampere, Ada, Hopper),
// fp32 accumulation:  C[M x N] = A[M x K] . B[K x N]  + the StridedGemm epilogue
// (accumulate into C, + bias_m[i], + bias_n[j]).
//
// Algorithm (the classic "multistage mma.sync" GEMM):
//  * One thread block (8 warps) owns a BM x BN tile of C and walks K in steps
//    of BK = 32. Tiles of A (BM x BK) and B (BK x BN) are copied global ->
//    shared with cp.async (16 bytes = 8 elements per copy, no registers used)
//    into a ring of STAGES buffers: while tile t is multiplied, tiles
//    t+1 .. t+STAGES-1 are in flight. Out-of-range rows / columns / K tail are
//    zero-filled by the copy itself (cp.async's src-size operand).
//  * Each operand has one unit-stride dimension, K or M/N ("K-contiguous" or
//    "MN-contiguous"); the shared tile keeps the global layout (the contiguous
//    dimension is the shared row), rows padded by 8 elements (16 bytes) so the
//    8 row addresses of every ldmatrix phase fall into 8 different 16-byte
//    bank groups: conflict-free without swizzling.
//  * Warps are a WARPS_M x WARPS_N grid, each a WM x WN block of C, made of
//    MI x NI mma tiles of 16 x 8 (m16n8k16: A 16x16, B 16x8, C 16x8).
//    Per k16 step a warp loads its A fragments with ldmatrix.x4 (one per 16
//    rows) and its B fragments with ldmatrix.x4 (one per 16 columns), then
//    issues MI * NI mma.sync. MN-contiguous operands use ldmatrix .trans.
//  * Epilogue straight from the accumulator registers (element-wise, or
//    2-element vector stores when C rows are unit-stride and aligned).
//  * Blocks are rasterised in groups of kTcGroupM tile rows (tile id -> (tm, tn)
//    column-major inside a group), so concurrently running blocks share A and
//    B tiles in L2. Only grid.x is used (no 65535 limit on tile rows).
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16; lane = 4 g + t):
//   A (row-major 16x16): a0 = A[g][2t,2t+1], a1 = A[g+8][2t,2t+1],
//                        a2 = A[g][2t+8,2t+9], a3 = A[g+8][2t+8,2t+9]
//   B (col-major 16x8):  b0 = B[2t,2t+1][g], b1 = B[2t+8,2t+9][g]
//   C (16x8, fp32):      c0,c1 = C[g][2t,2t+1], c2,c3 = C[g+8][2t,2t+1]
//   (two 16-bit elements per 32-bit register, the lower index in the low half)
// ldmatrix.x4: lane l gives the address of row l%8 of 8x8 matrix l/8; lane
// 4g+t receives, per matrix, row g, columns 2t, 2t+1 (.trans: rows 2t, 2t+1,
// column g, i.e. the transposed matrix). So, with kk the k16 step:
//   A stored [m][k]: no trans, lane l -> m = l%16,             k = kk + (l/16)*8
//   A stored [k][m]: trans,    lane l -> k = kk + l%8 + (l/16)*8, m = ((l/8)%2)*8
//   B stored [n][k]: no trans, lane l -> n = l%8 + (l/16)*8,   k = kk + ((l/8)%2)*8
//   B stored [k][n]: trans,    lane l -> k = kk + l%8 + ((l/8)%2)*8, n = (l/16)*8
// which yields {a0,a1,a2,a3}, and {b0,b1} of n-block 0 then {b0,b1} of n-block 1.
// The address maps are FL_HD functions so .ci/host_check_gemm_tc.cu can replay
// the whole kernel (copies, ldmatrix, mma, epilogue) on the host.
//
// Entry point: gemm_tc<S>(desc, stream): -1 when the problem does not qualify
// (the caller falls back to the generic kernels), else 0 / a cudaError_t code.
// Qualifies when: device is sm_80+ with enough shared memory, each of A and B
// has a unit stride in one dimension and the other stride a multiple of 8
// elements (any stride for a dimension of size 1), A and B 16-byte aligned,
// K >= 1, and the tile count fits in an int. C: any strides. Deterministic:
// every C element is one fixed-order sum, no atomics, no split-K.
#pragma once
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace fastlayers::cuda {
namespace tc {

constexpr int kThreads = 256;   // 8 warps
constexpr int kBK = 32;
constexpr int kPad = 8;          // elements of padding per shared row (16 bytes)
constexpr int kGroupM = 8;       // rasterisation: tile rows per group

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Cfg {
  static constexpr int BM = BM_, BN = BN_, BK = kBK, STAGES = STAGES_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;   // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;               // mma tiles per warp
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "8 warps");
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: 16-row / 16-column steps");
};
using CfgBig = Cfg<128, 256, 2, 4, 4>;     // warp 64 x 64
using CfgSmall = Cfg<128, 128, 2, 4, 4>;   // warp 64 x 32

// Shared tile of one operand: ROWS x COLS elements, COLS the unit-stride
// dimension, row pitch COLS + kPad. K_COLS: K runs along the columns.
template <int ROWS, int COLS>
struct Tile {
  static constexpr int LD = COLS + kPad;
  static constexpr int ELEMS = ROWS * LD;
  static constexpr int CPR = COLS / 8;                  // 16-byte chunks per row
  static constexpr int CHUNKS = ROWS * CPR / kThreads;  // copies per thread per stage
  static_assert(ROWS * CPR % kThreads == 0, "whole chunks per thread");
  // Chunk q (0 <= q < ROWS * CPR): row and first column.
  static FL_HD int row(int q) { return q / CPR; }
  static FL_HD int col(int q) { return (q % CPR) * 8; }
};

// Tile shapes of A and B for a config and layout. A_KC: A is K-contiguous
// (stored [m][k]), else M-contiguous ([k][m]); B_KC: B is K-contiguous
// ([n][k]), else N-contiguous ([k][n]).
template <class C, bool A_KC, bool B_KC>
struct Layout {
  using TA = Tile<A_KC ? C::BM : C::BK, A_KC ? C::BK : C::BM>;
  using TB = Tile<B_KC ? C::BN : C::BK, B_KC ? C::BK : C::BN>;
  static constexpr int A_STAGE = TA::ELEMS, B_STAGE = TB::ELEMS;   // elements
  static constexpr int SMEM_BYTES = C::STAGES * (A_STAGE + B_STAGE) * 2;

  // Element offset (within one stage) of the row address lane supplies to the
  // ldmatrix.x4 of A's mma tile mi at k16 step kk, for the warp whose C block
  // starts at row wm0 of the tile.
  static FL_HD int a_ldsm(int lane, int wm0, int mi, int kk) {
    if (A_KC) return (wm0 + mi * 16 + lane % 16) * TA::LD + kk + (lane / 16) * 8;
    return (kk + lane % 8 + (lane / 16) * 8) * TA::LD + wm0 + mi * 16 + ((lane / 8) % 2) * 8;
  }
  // Same for B's n-tile pair (2 p, 2 p + 1) of the warp starting at column wn0.
  static FL_HD int b_ldsm(int lane, int wn0, int p, int kk) {
    if (B_KC) return (wn0 + p * 16 + lane % 8 + (lane / 16) * 8) * TB::LD + kk + ((lane / 8) % 2) * 8;
    return (kk + lane % 8 + ((lane / 8) % 2) * 8) * TB::LD + wn0 + p * 16 + (lane / 16) * 8;
  }
};

// Bytes of a 16-byte chunk that lie inside the matrix: `rem` elements are
// left in the chunk's dimension from its first element.
FL_HD inline int chunk_bytes(int64_t rem) { return rem >= 8 ? 16 : rem > 0 ? int(rem) * 2 : 0; }

// Tile id -> (tile row, tile column), grouped rasterisation.
FL_HD inline void raster(int64_t id, int64_t tiles_m, int64_t tiles_n, int64_t& tm, int64_t& tn) {
  const int64_t per_group = int64_t(kGroupM) * tiles_n;
  const int64_t group = id / per_group, first_m = group * kGroupM;
  const int64_t rows = tiles_m - first_m < kGroupM ? tiles_m - first_m : kGroupM;
  const int64_t r = id - group * per_group;
  tm = first_m + r % rows;
  tn = r / rows;
}

template <typename S>
struct Params {
  int64_t M, N, K;
  const S* A; int64_t sA;   // stride of A's non-unit dimension (0 when that dimension is 1)
  const S* B; int64_t sB;
  S* C; int64_t rsC, csC;
  bool accumulate, vec2;    // vec2: C rows unit-stride, even pitch, 4-byte aligned
  const S* bias_m;
  const S* bias_n;
  int64_t tiles_m, tiles_n;
};

// ---- PTX wrappers (sm_80+) -----------------------------------------------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FL_TC_ARCH_OK 1
#endif

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
#ifdef FL_TC_ARCH_OK
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef FL_TC_ARCH_OK
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef FL_TC_ARCH_OK
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
#ifdef FL_TC_ARCH_OK
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#endif
}
template <typename S>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#ifdef FL_TC_ARCH_OK
  if constexpr (std::is_same_v<S, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <typename S> struct Pair;
template <> struct Pair<__half> {
  using T = __half2;
  static __device__ __forceinline__ T make(__half x, __half y) { return __halves2half2(x, y); }
};
template <> struct Pair<__nv_bfloat16> {
  using T = __nv_bfloat162;
  static __device__ __forceinline__ T make(__nv_bfloat16 x, __nv_bfloat16 y) {
    return __halves2bfloat162(x, y);
  }
};

// Global -> shared copies of one operand's tiles. The operand's fixed
// dimension (M or N) is [mn0, mn0 + tile extent) of MN; K advances one tile per
// load() call, starting at k = 0.
//   K_COLS (K-contiguous): shared row = m (or n), column = k.
//   else (MN-contiguous):  shared row = k, column = m (or n).
// Epilogue for the two neighbouring columns j, j + 1 of row crow (both mma
// layouts give a thread pairs): C = (accumulate ? C : 0) + v + bias_m + bias_n,
// one 2-element store when C rows are unit-stride and aligned (P.vec2).
// Shared with the wgmma kernel (gemm_wgmma.cuh).
template <typename S, class Prm>
__device__ __forceinline__ void store_c_pair(const Prm& P, S* crow, int64_t j, float v0, float v1,
                                             float bm) {
  if (P.vec2 && j + 1 < P.N) {
    using S2 = typename Pair<S>::T;
    S2* c2 = reinterpret_cast<S2*>(crow + j);
    if (P.accumulate) {
      const S2 old = *c2;
      v0 += Num<S>::to_acc(old.x);
      v1 += Num<S>::to_acc(old.y);
    }
    if (P.bias_m) { v0 += bm; v1 += bm; }
    if (P.bias_n) {
      v0 += Num<S>::to_acc(P.bias_n[j]);
      v1 += Num<S>::to_acc(P.bias_n[j + 1]);
    }
    *c2 = Pair<S>::make(Num<S>::from_acc(v0), Num<S>::from_acc(v1));
    return;
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    if (j + e >= P.N) break;
    float v = e ? v1 : v0;
    S* c = crow + (j + e) * P.csC;
    if (P.accumulate) v += Num<S>::to_acc(*c);
    if (P.bias_m) v += bm;
    if (P.bias_n) v += Num<S>::to_acc(P.bias_n[j + e]);
    *c = Num<S>::from_acc(v);
  }
}

// The problem's sizes, pointers and epilogue from the descriptor (both
// tensor-core GEMMs; the operand strides are set by their qualify checks).
template <typename S>
inline void set_problem(Params<S>& P, const GemmDesc& d) {
  P.M = d.M; P.N = d.N; P.K = d.K;
  P.A = static_cast<const S*>(d.A);
  P.B = static_cast<const S*>(d.B);
  P.C = static_cast<S*>(d.C); P.rsC = d.rsC; P.csC = d.csC;
  P.accumulate = d.accumulate;
  P.vec2 = d.csC == 1 && d.rsC % 2 == 0 && reinterpret_cast<uintptr_t>(d.C) % 4 == 0;
  P.bias_m = static_cast<const S*>(d.bias_m);
  P.bias_n = static_cast<const S*>(d.bias_n);
}

template <typename S, class T, bool K_COLS>
struct Loader {
  const S* base;
  const S* p[T::CHUNKS];   // source of chunk i in the current K tile
  int fixed[T::CHUNKS];    // K_COLS: 1 if the row is inside MN; else bytes inside MN
  int64_t step;            // pointer advance per K tile

  FL_HD __forceinline__ void init(const S* g, int64_t stride, int64_t mn0, int64_t MN, int tid) {
    base = g;
    step = K_COLS ? int64_t(kBK) : int64_t(kBK) * stride;
FL_UNROLL
    for (int i = 0; i < T::CHUNKS; ++i) {
      const int q = tid + i * kThreads, r = T::row(q), c = T::col(q);
      if (K_COLS) {
        const int64_t mn = mn0 + r;
        fixed[i] = mn < MN;
        p[i] = fixed[i] ? g + mn * stride + c : g;
      } else {
        const int64_t mn = mn0 + c;
        fixed[i] = chunk_bytes(MN - mn);
        p[i] = fixed[i] ? g + int64_t(r) * stride + mn : g;
      }
    }
  }
  // Issues the copies of the next K tile (krem = K - its first k):
  // copy(element offset in the stage, source, bytes to read; the rest of the
  // 16 bytes is zero-filled).
  template <class Copy>
  FL_HD __forceinline__ void load(int64_t krem, int tid, Copy&& copy) {
FL_UNROLL
    for (int i = 0; i < T::CHUNKS; ++i) {
      const int q = tid + i * kThreads, r = T::row(q), c = T::col(q);
      const int bytes = K_COLS ? (fixed[i] ? chunk_bytes(krem - c) : 0) : (r < krem ? fixed[i] : 0);
      copy(r * T::LD + c, bytes ? p[i] : base, bytes);
      p[i] += step;
    }
  }
  __device__ __forceinline__ void load(uint32_t dst, int64_t krem, int tid) {
    load(krem, tid, [dst](int off, const S* src, int bytes) {
      cp_async16(dst + uint32_t(off * 2), src, bytes);
    });
  }
};

template <typename S, class CF, bool A_KC, bool B_KC>
__global__ void __launch_bounds__(kThreads, 1) gemm_tc_kernel(Params<S> P) {
  using L = Layout<CF, A_KC, B_KC>;
  using TA = typename L::TA;
  using TB = typename L::TB;
  constexpr int BM = CF::BM, BN = CF::BN, BK = CF::BK, STAGES = CF::STAGES;
  constexpr int MI = CF::MI, NI = CF::NI;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm0 = (warp / CF::WARPS_N) * CF::WM, wn0 = (warp % CF::WARPS_N) * CF::WN;
  int64_t tm, tn;
  raster(blockIdx.x, P.tiles_m, P.tiles_n, tm, tn);
  const int64_t m0 = tm * BM, n0 = tn * BN;

  const uint32_t sbase = uint32_t(__cvta_generic_to_shared(smem_raw));
  const uint32_t sA = sbase, sB = sbase + STAGES * L::A_STAGE * 2;

  Loader<S, TA, A_KC> la;
  Loader<S, TB, B_KC> lb;
  la.init(P.A, P.sA, m0, P.M, tid);
  lb.init(P.B, P.sB, n0, P.N, tid);

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  const int64_t ktiles = (P.K + BK - 1) / BK;
  // Prologue: tiles 0 .. STAGES-2 in flight (one commit group each, possibly empty).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) {
      la.load(sA + s * L::A_STAGE * 2, P.K - int64_t(s) * BK, tid);
      lb.load(sB + s * L::B_STAGE * 2, P.K - int64_t(s) * BK, tid);
    }
    cp_async_commit();
  }

  const uint32_t a_lane = uint32_t(L::a_ldsm(lane, wm0, 0, 0) * 2);
  const uint32_t b_lane = uint32_t(L::b_ldsm(lane, wn0, 0, 0) * 2);
  int rd = 0, wr = STAGES - 1;   // stage computed / stage filled this iteration
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    // Tile kt has landed (groups 0..kt done) for every thread's copies, and
    // every warp is done with the stage about to be overwritten (kt - 1's).
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int64_t kn = kt + STAGES - 1;
    if (kn < ktiles) {
      la.load(sA + wr * L::A_STAGE * 2, P.K - kn * BK, tid);
      lb.load(sB + wr * L::B_STAGE * 2, P.K - kn * BK, tid);
    }
    cp_async_commit();

    const uint32_t a_st = sA + rd * L::A_STAGE * 2 + a_lane;
    const uint32_t b_st = sB + rd * L::B_STAGE * 2 + b_lane;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MI][4], bf[NI / 2][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)   // lane-independent part of the address
        ldsm_x4<!A_KC>(a_st + uint32_t((L::a_ldsm(0, 0, mi, kk) - L::a_ldsm(0, 0, 0, 0)) * 2),
                       af[mi]);
#pragma unroll
      for (int p = 0; p < NI / 2; ++p)
        ldsm_x4<!B_KC>(b_st + uint32_t((L::b_ldsm(0, 0, p, kk) - L::b_ldsm(0, 0, 0, 0)) * 2),
                       bf[p]);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          mma16816<S>(acc[mi][ni], af[mi], bf[ni / 2][(ni % 2) * 2], bf[ni / 2][(ni % 2) * 2 + 1]);
    }
    rd = rd + 1 == STAGES ? 0 : rd + 1;
    wr = wr + 1 == STAGES ? 0 : wr + 1;
  }
  cp_async_wait<0>();   // only empty groups can be pending; leave nothing in flight

  // Epilogue: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at row g + 8.
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = m0 + wm0 + mi * 16 + g + h * 8;
      if (i >= P.M) continue;
      const float bm = P.bias_m ? Num<S>::to_acc(P.bias_m[i]) : 0.f;
      S* crow = P.C + i * P.rsC;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int64_t j = n0 + wn0 + ni * 8 + 2 * t;
        if (j >= P.N) continue;
        store_c_pair<S>(P, crow, j, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], bm);
      }
    }
  }
}

// ---- host side ------------------------------------------------------------------

// Operand with rows x cols, element (r, c) at r * rs + c * cs. Returns 1 when
// the columns are unit-stride (row stride -> *stride), 2 when the rows are
// (column stride -> *stride), 0 when neither qualifies.
inline int unit_dim(int64_t rows, int64_t cols, int64_t rs, int64_t cs, int64_t* stride) {
  if ((cs == 1 || cols == 1) && (rows == 1 || (rs >= 0 && rs % 8 == 0))) {
    *stride = rows == 1 ? 0 : rs;
    return 1;
  }
  if ((rs == 1 || rows == 1) && (cols == 1 || (cs >= 0 && cs % 8 == 0))) {
    *stride = cols == 1 ? 0 : cs;
    return 2;
  }
  return 0;
}

struct Device { int sms = 0, smem_optin = 0, major = 0; };
inline int device_info(Device* dev, int* id) {
  int e = int(cudaGetDevice(id));
  if (!e) e = int(cudaDeviceGetAttribute(&dev->major, cudaDevAttrComputeCapabilityMajor, *id));
  if (!e) e = int(cudaDeviceGetAttribute(&dev->sms, cudaDevAttrMultiProcessorCount, *id));
  if (!e) e = int(cudaDeviceGetAttribute(&dev->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, *id));
  return e;
}

// Largest dynamic shared memory any instantiation asks for.
constexpr int max_smem_bytes() {
  int m = 0;
  const int v[] = {Layout<CfgBig, true, true>::SMEM_BYTES, Layout<CfgBig, true, false>::SMEM_BYTES,
                   Layout<CfgBig, false, true>::SMEM_BYTES, Layout<CfgBig, false, false>::SMEM_BYTES,
                   Layout<CfgSmall, true, true>::SMEM_BYTES, Layout<CfgSmall, true, false>::SMEM_BYTES,
                   Layout<CfgSmall, false, true>::SMEM_BYTES, Layout<CfgSmall, false, false>::SMEM_BYTES};
  for (int x : v) m = x > m ? x : m;
  return m;
}

// Whether gemm_tc takes this problem (shape, strides, alignment, device):
// the same answer for the workspace query and the launch.
inline bool qualifies(const GemmDesc& d, int64_t* sA, int64_t* sB, bool* a_kc, bool* b_kc) {
  if (d.M <= 0 || d.N <= 0 || d.K <= 0) return false;
  const int ua = unit_dim(d.M, d.K, d.rsA, d.csA, sA);
  const int ub = unit_dim(d.K, d.N, d.rsB, d.csB, sB);
  if (!ua || !ub) return false;
  if ((reinterpret_cast<uintptr_t>(d.A) | reinterpret_cast<uintptr_t>(d.B)) % 16) return false;
  // Tile ids (with the smaller tile) and the 64-bit offsets must fit.
  if (ceil_div(d.M, 128) * ceil_div(d.N, 128) > 2147483647LL) return false;
  *a_kc = ua == 1;   // A (M x K): columns = K unit-stride
  *b_kc = ub == 2;   // B (K x N): rows = K unit-stride
  Device dev; int id = 0;
  if (device_info(&dev, &id)) { (void)cudaGetLastError(); return false; }
  return dev.major >= 8 && dev.smem_optin >= max_smem_bytes();
}

template <typename S, class CF, bool A_KC, bool B_KC>
int launch(const Params<S>& P, int device, cudaStream_t stream) {
  auto kern = gemm_tc_kernel<S, CF, A_KC, B_KC>;
  constexpr int smem = Layout<CF, A_KC, B_KC>::SMEM_BYTES;
  // Opt in to > 48 KB of dynamic shared memory once per device.
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (!bit || !(done.load(std::memory_order_acquire) & bit)) {
    const int e = int(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (e) return e;
    done.fetch_or(bit, std::memory_order_acq_rel);
  }
  const int64_t tiles = P.tiles_m * P.tiles_n;
  kern<<<unsigned(tiles), kThreads, smem, stream>>>(P);
  return last_error();
}

template <typename S, class CF>
int launch_cfg(Params<S> P, bool a_kc, bool b_kc, int device, cudaStream_t stream) {
  P.tiles_m = ceil_div(P.M, CF::BM);
  P.tiles_n = ceil_div(P.N, CF::BN);
  if (a_kc && b_kc) return launch<S, CF, true, true>(P, device, stream);
  if (a_kc) return launch<S, CF, true, false>(P, device, stream);
  if (b_kc) return launch<S, CF, false, true>(P, device, stream);
  return launch<S, CF, false, false>(P, device, stream);
}

}  // namespace tc

// Whether gemm_tc<S>(d, ...) would run (not return -1) for this problem.
inline bool gemm_tc_ok(const GemmDesc& d) {
  int64_t sA, sB; bool a_kc, b_kc;
  return tc::qualifies(d, &sA, &sB, &a_kc, &b_kc);
}

// C = A . B (+ epilogue) on tensor cores. S = __half or __nv_bfloat16.
// Returns -1 when the problem does not qualify (nothing was launched).
template <typename S>
int gemm_tc(const GemmDesc& d, cudaStream_t stream) {
  static_assert(std::is_same_v<S, __half> || std::is_same_v<S, __nv_bfloat16>, "f16 / bf16 only");
  tc::Params<S> P;
  bool a_kc = false, b_kc = false;
  if (!tc::qualifies(d, &P.sA, &P.sB, &a_kc, &b_kc)) return -1;
  tc::Device dev; int id = 0;
  if (const int e = tc::device_info(&dev, &id)) return e;
  tc::set_problem(P, d);
  // The big tile (128 x 256) once it gives every SM a block; else 128 x 128.
  if (ceil_div(d.M, tc::CfgBig::BM) * ceil_div(d.N, tc::CfgBig::BN) >= dev.sms)
    return tc::launch_cfg<S, tc::CfgBig>(P, a_kc, b_kc, id, stream);
  return tc::launch_cfg<S, tc::CfgSmall>(P, a_kc, b_kc, id, stream);
}

}  // namespace fastlayers::cuda
