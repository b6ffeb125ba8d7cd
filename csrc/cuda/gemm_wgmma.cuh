// wgmma GEMM for float16 / bfloat16 on Hopper (sm_90a), fp32 accumulation, for
// the K-major x K-major case:  C[M x N] = A[M x K] . B[K x N] with A stored
// [m][k] and B stored [n][k] (both K-contiguous: Linear forward X . W^T), plus
// the StridedGemm epilogue (accumulate into C, + bias_m[i], + bias_n[j]).
//
// Algorithm (the cp.async + wgmma "multistage" recipe, no TMA, no producer warp):
//  * One block (2 warpgroups, 256 threads) owns a 128 x BN tile of C (BN = 256,
//    or 128 when there are fewer tiles than SMs); warpgroup g computes rows
//    64 g .. 64 g + 63 with one wgmma.m64nBNk16 per k16 step, accumulators in
//    registers (BN / 2 floats per thread).
//  * K advances in tiles of BK = 64 elements = 128 bytes = one row of the
//    128-byte swizzle. All 256 threads copy A (128 x 64) and B (BN x 64) tiles
//    global -> shared with 16-byte cp.async into a ring of STAGES stages, in
//    the layout wgmma's SWIZZLE_128B K-major descriptor expects: rows of 128
//    bytes, 16-byte chunk c of row r stored at chunk c ^ (r % 8), every stage
//    1024-byte aligned (8-row swizzle atoms). Out-of-range rows and the K tail
//    are zero-filled by the copies (cp.async src-size), like gemm_tc.
//  * Per K tile: wait for its copies, fence.proxy.async (generic-proxy writes
//    -> visible to wgmma's async proxy), __syncthreads, 4 wgmma (k16 steps:
//    descriptor start + 32 bytes each), commit; then issue the copies of tile
//    kt + STAGES - 2 and wgmma.wait_group 1 (tile kt - 1's group done). So the
//    stage refilled at iteration kt (tile kt - 2's) is no longer read by any
//    warpgroup: each passed wait_group 1 after issuing kt - 1, before the
//    barrier.
//  * Epilogue from the registers as in gemm_tc; grouped rasterisation
//    (tc::raster). Deterministic: fixed-order K sum, no split-K, no atomics.
//
// Shared-memory matrix descriptor (64 bits, PTX ISA "matrix-descriptor"):
//   bits [0,14) start address >> 4, [16,30) leading byte offset >> 4 (unused
//   for swizzled K-major; 1), [32,46) stride byte offset >> 4 = 1024 >> 4
//   (8 rows x 128 bytes), [49,52) base offset = 0 (1024-aligned atoms),
//   [62,64) layout = 1: 128-byte swizzle.
// Accumulator fragment of m64nNk16 (fp32): thread t of the warpgroup (warp
//   w = t / 32, lane l) holds d[4 j + e] at row 16 w + l / 4 + 8 (e / 2),
//   column 8 j + 2 (l % 4) + e % 2.
//
// The device code exists only in the sm_90a image (__CUDA_ARCH_FEAT_SM90_ALL);
// other images get empty kernels. The host side checks that the image the
// driver loaded is the sm_90a one (probe kernel with static shared memory
// only there) and otherwise declines (-1), as it does for any problem that
// does not qualify: then gemm_tc / the SIMT kernels run.
// First run on a GPU on 2026-11-28 (H200); FASTLAYERS_CUDA_NEW=0 turns it off (common.cuh).
// Env: FASTLAYERS_NO_WGMMA=1 declines always (read per call);
// FASTLAYERS_WGMMA_LOG=1 prints one stderr line per wgmma launch.
#pragma once
#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "gemm_tc.cuh"

namespace fastlayers::cuda {
namespace wg {

constexpr int kThreads = 256;   // 2 warpgroups
constexpr int kBM = 128, kBK = 64;
constexpr int kRowBytes = kBK * 2;   // 128: one swizzle row

template <int BN_, int STAGES_>
struct Cfg {
  static constexpr int BN = BN_, STAGES = STAGES_;
  static constexpr int A_BYTES = kBM * kRowBytes, B_BYTES = BN * kRowBytes;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;   // + alignment slack
  static constexpr int ACC = BN / 2;                               // floats per thread
  static constexpr int A_COPIES = kBM * 8 / kThreads, B_COPIES = BN * 8 / kThreads;
  static_assert(STAGE_BYTES % 1024 == 0 && A_BYTES % 1024 == 0, "1024-byte aligned atoms");
  static_assert(STAGES >= 3, "ring: computed, in flight, refilled");
};
using CfgBig = Cfg<256, 4>;     // 193 KB of shared memory
using CfgSmall = Cfg<128, 6>;   // 193 KB

// Byte offset of 16-byte chunk c (k = 8 c .. 8 c + 7) of row r in a tile of
// 128-byte rows with the 128-byte swizzle.
FL_HD inline int swz(int r, int c) { return r * kRowBytes + ((c ^ (r & 7)) << 4); }
// Copy map: thread tid copies chunk tid % 8 of the rows tid / 8 + 32 i.
FL_HD inline int copy_row(int tid, int i) { return tid / 8 + 32 * i; }
FL_HD inline int copy_chunk(int tid) { return tid % 8; }
// Accumulator map (see the header comment); t = thread index in the warpgroup.
FL_HD inline int acc_row(int t, int e) { return 16 * (t / 32) + (t % 32) / 4 + 8 * (e / 2); }
FL_HD inline int acc_col(int t, int j, int e) { return 8 * j + 2 * (t % 4) + e % 2; }

// Descriptor bits above the start address: LBO 1 (16 B), SBO 64 (1024 B), 128B swizzle.
constexpr uint64_t kDescHi = (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
static_assert(kDescHi == 0x4000004000010000ull, "wgmma descriptor: LBO 16 B, SBO 1024 B, 128-byte swizzle");
FL_HD inline uint64_t make_desc(uint32_t smem_addr) {
  return kDescHi | uint64_t((smem_addr & 0x3FFFF) >> 4);
}

// ---- PTX wrappers (sm_90a only) ----------------------------------------------------
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FL_WGMMA_OK 1
#endif

#define FL_WGMMA_F8(d, i)                                                                     \
  "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define FL_WGMMA_REGS_256 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define FL_WGMMA_OUT_256(d) FL_WGMMA_F8(d, 0), FL_WGMMA_F8(d, 8), FL_WGMMA_F8(d, 16), FL_WGMMA_F8(d, 24), FL_WGMMA_F8(d, 32), FL_WGMMA_F8(d, 40), FL_WGMMA_F8(d, 48), FL_WGMMA_F8(d, 56), FL_WGMMA_F8(d, 64), FL_WGMMA_F8(d, 72), FL_WGMMA_F8(d, 80), FL_WGMMA_F8(d, 88), FL_WGMMA_F8(d, 96), FL_WGMMA_F8(d, 104), FL_WGMMA_F8(d, 112), FL_WGMMA_F8(d, 120)
#define FL_WGMMA_REGS_128 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FL_WGMMA_OUT_128(d) FL_WGMMA_F8(d, 0), FL_WGMMA_F8(d, 8), FL_WGMMA_F8(d, 16), FL_WGMMA_F8(d, 24), FL_WGMMA_F8(d, 32), FL_WGMMA_F8(d, 40), FL_WGMMA_F8(d, 48), FL_WGMMA_F8(d, 56)
// d += A . B for one k16 step; A, B from shared memory descriptors, both K-major
// (trans flags 0), scale-d = 1 (accumulate), scale-a = scale-b = 1.
#define FL_WGMMA_ASM(NN, TY, IA, IB, IS)                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                             \
               "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TY "." TY " {" FL_WGMMA_REGS_##NN \
               "}, %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                                 \
               : FL_WGMMA_OUT_##NN(d)                                                       \
               : "l"(da), "l"(db), "n"(1))

template <typename S, int N>
__device__ __forceinline__ void wgmma(float (&d)[N / 2], uint64_t da, uint64_t db) {
#ifdef FL_WGMMA_OK
  constexpr bool bf = std::is_same_v<S, __nv_bfloat16>;
  if constexpr (N == 256 && bf) FL_WGMMA_ASM(256, "bf16", 128, 129, 130);
  else if constexpr (N == 256) FL_WGMMA_ASM(256, "f16", 128, 129, 130);
  else if constexpr (N == 128 && bf) FL_WGMMA_ASM(128, "bf16", 64, 65, 66);
  else FL_WGMMA_ASM(128, "f16", 64, 65, 66);
#endif
}

__device__ __forceinline__ void wgmma_fence() {   // before wgmmas that use registers / smem written before
#ifdef FL_WGMMA_OK
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FL_WGMMA_OK
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {   // at most N committed groups still pending
#ifdef FL_WGMMA_OK
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy writes to shared memory (cp.async) -> visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
#ifdef FL_WGMMA_OK
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accumulator reads / writes across the
// asynchronous wgmma region (the registers are written until wait_group).
template <int N>
__device__ __forceinline__ void fence_acc(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// This thread's global -> shared copies of one K tile (A's 128 x 64 and B's
// BN x 64 elements, at k0 .. k0 + 63): copy(b, dst, src, bytes) per 16-byte
// chunk, b: operand B (else A), dst: byte offset in the stage (B's tile starts
// at A_BYTES), src: element offset from the operand's base, bytes: bytes to
// read (the rest zero-filled; 0: src is 0, nothing read). Thread tid copies
// chunk copy_chunk(tid) of rows copy_row(tid, i), i.e. swz(row, c) =
// dst0 + i * 32 * 128 (32 i does not change row % 8).
template <class CF>
struct Copies {
  int c;
  uint32_t dst0, okA, okB;   // ok*: bit i set when copy i's row is inside M (N)
  int64_t offA, offB, sA, sB, K;
  FL_HD void init(int tid, int64_t m0, int64_t n0, int64_t M, int64_t N, int64_t K_, int64_t sA_,
                  int64_t sB_) {
    c = copy_chunk(tid);
    const int r0 = copy_row(tid, 0);
    dst0 = uint32_t(swz(r0, c));
    sA = sA_; sB = sB_; K = K_;
    offA = (m0 + r0) * sA + 8 * c;
    offB = (n0 + r0) * sB + 8 * c;
    okA = okB = 0;
    for (int i = 0; i < CF::A_COPIES; ++i) okA |= uint32_t(m0 + copy_row(tid, i) < M) << i;
    for (int i = 0; i < CF::B_COPIES; ++i) okB |= uint32_t(n0 + copy_row(tid, i) < N) << i;
  }
  template <class F>
  FL_HD __forceinline__ void tile(int64_t k0, F&& copy) const {
    const int bytes = tc::chunk_bytes(K - k0 - 8 * c);
FL_UNROLL
    for (int i = 0; i < CF::A_COPIES; ++i) {
      const bool ok = bytes && ((okA >> i) & 1);
      copy(false, dst0 + uint32_t(i * 32 * kRowBytes), ok ? offA + i * 32 * sA + k0 : 0, ok ? bytes : 0);
    }
FL_UNROLL
    for (int i = 0; i < CF::B_COPIES; ++i) {
      const bool ok = bytes && ((okB >> i) & 1);
      copy(true, uint32_t(CF::A_BYTES) + dst0 + uint32_t(i * 32 * kRowBytes),
           ok ? offB + i * 32 * sB + k0 : 0, ok ? bytes : 0);
    }
  }
};

template <typename S, class CF>
__global__ void __launch_bounds__(kThreads, 1) gemm_wgmma_kernel(tc::Params<S> P) {
#ifdef FL_WGMMA_OK
  constexpr int BN = CF::BN, STAGES = CF::STAGES;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int tid = threadIdx.x, g = tid / 128, t = tid % 128;
  int64_t tm, tn;
  tc::raster(blockIdx.x, P.tiles_m, P.tiles_n, tm, tn);
  const int64_t m0 = tm * kBM, n0 = tn * BN;
  // Stage s: A tile at sbase + s * STAGE_BYTES, B tile A_BYTES after it.
  const uint32_t sbase = (uint32_t(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;

  Copies<CF> cp;
  cp.init(tid, m0, n0, P.M, P.N, P.K, P.sA, P.sB);
  auto load = [&](int stage, int64_t k0) {
    const uint32_t st = sbase + stage * CF::STAGE_BYTES;
    cp.tile(k0, [&](bool b, uint32_t dst, int64_t src, int bytes) {
      tc::cp_async16(st + dst, (b ? P.B : P.A) + src, bytes);
    });
  };

  float acc[CF::ACC];
#pragma unroll
  for (int i = 0; i < CF::ACC; ++i) acc[i] = 0.f;

  const int64_t ktiles = (P.K + kBK - 1) / kBK;
  // Prologue: tiles 0 .. STAGES-3 in flight (one commit group each, possibly empty).
#pragma unroll
  for (int s = 0; s < STAGES - 2; ++s) {
    if (s < ktiles) load(s, int64_t(s) * kBK);
    tc::cp_async_commit();
  }
  // Descriptors of stage 0: this warpgroup's 64 rows of A, all BN rows of B.
  const uint32_t a0 = sbase + g * 64 * kRowBytes, b0 = sbase + CF::A_BYTES;
  int rd = 0, wr = STAGES - 2;   // stage computed / stage refilled this iteration
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    tc::cp_async_wait<STAGES - 3>();   // this thread's copies of tile kt landed
    fence_proxy_async();
    __syncthreads();                   // everyone's; and tile kt - 2's wgmmas are done
    const uint32_t so = uint32_t(rd * CF::STAGE_BYTES);
    const uint64_t da = make_desc(a0 + so), db = make_desc(b0 + so);
    fence_acc(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)   // k16 step: + 32 bytes = + 2 in the address field
      wgmma<S, BN>(acc, da + uint64_t(2 * kk), db + uint64_t(2 * kk));
    wgmma_commit();
    const int64_t kn = kt + STAGES - 2;
    if (kn < ktiles) load(wr, kn * kBK);
    tc::cp_async_commit();
    wgmma_wait<1>();
    fence_acc(acc);
    rd = rd + 1 == STAGES ? 0 : rd + 1;
    wr = wr + 1 == STAGES ? 0 : wr + 1;
  }
  wgmma_wait<0>();
  fence_acc(acc);
  tc::cp_async_wait<0>();   // only empty groups can be pending; leave nothing in flight

  // Epilogue: d[4 j + e] at (acc_row(t, e), acc_col(t, j, e)) of this warpgroup's 64 x BN block.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = m0 + 64 * g + acc_row(t, 2 * h);
    if (i >= P.M) continue;
    const float bm = P.bias_m ? Num<S>::to_acc(P.bias_m[i]) : 0.f;
    S* crow = P.C + i * P.rsC;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int64_t jj = n0 + acc_col(t, j, 0);
      if (jj >= P.N) continue;
      tc::store_c_pair<S>(P, crow, jj, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], bm);
    }
  }
#endif
}

// Has static shared memory only in the sm_90a image: cudaFuncGetAttributes
// then tells which image the driver loaded for this translation unit (no
// launch, so it is safe during stream capture).
constexpr int kProbeShared = 4096;
template <int = 0>
__global__ void wgmma_probe_kernel(int* out) {
#ifdef FL_WGMMA_OK
  __shared__ int mark[kProbeShared / 4];
  mark[threadIdx.x % (kProbeShared / 4)] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = mark[(threadIdx.x + 1) % (kProbeShared / 4)];
#else
  (void)out;
#endif
}

// ---- host side ------------------------------------------------------------------

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && !(v[0] == '0' && v[1] == 0);
}

// Whether the loaded image of this file is sm_90a, per device (cached).
inline bool image_ok(int device) {
  static std::atomic<uint64_t> known{0}, good{0};
  if (device < 0 || device >= 64) return false;
  const uint64_t bit = uint64_t(1) << device;
  if (!(known.load(std::memory_order_acquire) & bit)) {
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, wgmma_probe_kernel<0>) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    if (a.sharedSizeBytes >= size_t(kProbeShared)) good.fetch_or(bit, std::memory_order_acq_rel);
    known.fetch_or(bit, std::memory_order_acq_rel);
    if (!(good.load(std::memory_order_acquire) & bit) && env_flag("FASTLAYERS_WGMMA_LOG"))
      std::fprintf(stderr, "fastlayers wgmma: no sm_90a image loaded on device %d\n", device);
  }
  return (good.load(std::memory_order_acquire) & bit) != 0;
}

// Whether gemm_wgmma takes this problem: the same answer for the workspace
// query and the launch. *ldA / *ldB: leading strides (0 for a single row).
inline bool qualifies(const GemmDesc& d, int64_t* ldA, int64_t* ldB, tc::Device* dev, int* id) {
  if (!new_paths_enabled() || env_flag("FASTLAYERS_NO_WGMMA")) return false;
  if (d.M <= 0 || d.N <= 0 || d.K <= 0) return false;
  if (d.csA != 1 || d.rsB != 1) return false;   // both K-contiguous
  *ldA = d.M == 1 ? 0 : d.rsA;
  *ldB = d.N == 1 ? 0 : d.csB;
  if (*ldA < 0 || *ldA % 8 || *ldB < 0 || *ldB % 8) return false;
  if ((reinterpret_cast<uintptr_t>(d.A) | reinterpret_cast<uintptr_t>(d.B)) % 16) return false;
  if (ceil_div(d.M, kBM) * ceil_div(d.N, 128) > 2147483647LL) return false;
  if (tc::device_info(dev, id)) { (void)cudaGetLastError(); return false; }
  if (dev->major != 9 || dev->smem_optin < CfgBig::SMEM_BYTES || dev->smem_optin < CfgSmall::SMEM_BYTES)
    return false;
  return image_ok(*id);
}

template <typename S, class CF>
int launch(tc::Params<S> P, int device, cudaStream_t stream) {
  auto kern = gemm_wgmma_kernel<S, CF>;
  static std::atomic<uint64_t> done{0};   // > 48 KB dynamic shared memory: opt in once per device
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (!bit || !(done.load(std::memory_order_acquire) & bit)) {
    const int e = int(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           CF::SMEM_BYTES));
    if (e) return e;
    done.fetch_or(bit, std::memory_order_acq_rel);
  }
  P.tiles_m = ceil_div(P.M, kBM);
  P.tiles_n = ceil_div(P.N, CF::BN);
  if (env_flag("FASTLAYERS_WGMMA_LOG"))
    std::fprintf(stderr, "fastlayers wgmma: M=%lld N=%lld K=%lld tile 128x%d\n", (long long)P.M,
                 (long long)P.N, (long long)P.K, CF::BN);
  kern<<<unsigned(P.tiles_m * P.tiles_n), kThreads, CF::SMEM_BYTES, stream>>>(P);
  return last_error();
}

}  // namespace wg

// C = A . B (+ epilogue) with wgmma, A and B K-contiguous; S = __half or
// __nv_bfloat16. Returns -1 when the problem or the device does not qualify
// (nothing was launched), else 0 / a cudaError_t code.
template <typename S>
int gemm_wgmma(const GemmDesc& d, cudaStream_t stream) {
  static_assert(std::is_same_v<S, __half> || std::is_same_v<S, __nv_bfloat16>, "f16 / bf16 only");
  tc::Params<S> P;
  tc::Device dev;
  int id = 0;
  if (!wg::qualifies(d, &P.sA, &P.sB, &dev, &id)) return -1;
  tc::set_problem(P, d);
  // 128 x 256 tiles once they give every SM a block; else 128 x 128.
  if (ceil_div(d.M, wg::kBM) * ceil_div(d.N, wg::CfgBig::BN) >= dev.sms)
    return wg::launch<S, wg::CfgBig>(P, id, stream);
  return wg::launch<S, wg::CfgSmall>(P, id, stream);
}

// Whether gemm_wgmma<S>(d, ...) would run (not return -1), for f16 / bf16.
inline bool gemm_wgmma_ok_impl(const GemmDesc& d) {
  int64_t a, b; tc::Device dev; int id = 0;
  return wg::qualifies(d, &a, &b, &dev, &id);
}

}  // namespace fastlayers::cuda
