// Device-side helpers shared by the fastlayers CUDA kernels (no torch).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "launchers.h"

// Device code that is also compiled for the host, so the index maps can be
// checked on a machine without a GPU (.ci/host_check.cu).
#define FL_HD __host__ __device__

// "#pragma unroll" for loops in FL_HD code: only in the device pass (the host
// compiler does not know the pragma and warns).
#ifdef __CUDA_ARCH__
#define FL_UNROLL _Pragma("unroll")
#else
#define FL_UNROLL
#endif

namespace fastlayers::cuda {

// Storage type T <-> accumulation type Acc. Written with the explicit
// intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename T> struct Num;
template <> struct Num<float> {
  using Acc = float;
  static FL_HD __forceinline__ float to_acc(float x) { return x; }
  static FL_HD __forceinline__ float from_acc(float x) { return x; }
};
template <> struct Num<double> {
  using Acc = double;
  static FL_HD __forceinline__ double to_acc(double x) { return x; }
  static FL_HD __forceinline__ double from_acc(double x) { return x; }
};
template <> struct Num<__half> {
  using Acc = float;
  static FL_HD __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static FL_HD __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};
template <> struct Num<__nv_bfloat16> {
  using Acc = float;
  static FL_HD __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static FL_HD __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
FL_HD __forceinline__ T zero_of() { return Num<T>::from_acc(typename Num<T>::Acc(0)); }

// Reads element i of a tensor whose dtype is only known at run time
// (per-channel parameters), as Acc.
template <typename Acc>
__device__ __forceinline__ Acc load_any(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::F32: return Acc(static_cast<const float*>(p)[i]);
    case DType::F64: return Acc(static_cast<const double*>(p)[i]);
    case DType::F16: return Acc(__half2float(static_cast<const __half*>(p)[i]));
    default: return Acc(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
  }
}
template <typename Acc>
__device__ __forceinline__ void store_any(void* p, DType dt, int64_t i, Acc v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(p)[i] = float(v); break;
    case DType::F64: static_cast<double*>(p)[i] = double(v); break;
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(float(v)); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(float(v)); break;
  }
}

// a / b for non-negative int64 values: 32-bit division when both fit (the
// usual case); the rare 64-bit one is an out-of-line call to keep kernels small.
static FL_HD __noinline__ int64_t div64(int64_t a, int64_t b) { return a / b; }
FL_HD __forceinline__ int64_t divq(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return int64_t(uint32_t(a) / uint32_t(b));
  return div64(a, b);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over n items with `block` threads.
inline unsigned grid_for(int64_t n, int block, int64_t cap = 65535LL * 16) {
  int64_t g = ceil_div(n, block);
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return unsigned(g);
}

inline int last_error() { return int(cudaGetLastError()); }

// The newest kernels: the wgmma GEMM, the channels_last BatchNorm row kernels and
// the 3x3/stride-2 MaxPool backward. Written without a GPU, they stayed off until
// their first GPU run (H200, 2026-11-28: tests passed, faster than the kernels
// they replace) and are now the default. FASTLAYERS_CUDA_NEW=0 (read per call)
// turns them off, so the older kernels, still used for other shapes and GPUs,
// are tested and timed on the same data (benchmarks/gpu_check.sh runs both).
inline bool new_paths_enabled() {
  const char* e = std::getenv("FASTLAYERS_CUDA_NEW");
  return e == nullptr || std::strcmp(e, "0") != 0;   // as env_flag reads "0"
}

// Decomposes a linear index in memory order of a dense 4-D tensor into
// (n, c, h, w): NCHW order, or NHWC order when channels_last.
FL_HD __forceinline__ void decode4(int64_t q, int64_t C, int64_t H, int64_t W,
                                        bool channels_last, int64_t& n, int64_t& c,
                                        int64_t& h, int64_t& w) {
  if (channels_last) {
    int64_t t = divq(q, C); c = q - t * C;
    int64_t t2 = divq(t, W); w = t - t2 * W;
    n = divq(t2, H); h = t2 - n * H;
  } else {
    int64_t t = divq(q, W); w = q - t * W;
    int64_t t2 = divq(t, H); h = t - t2 * H;
    n = divq(t2, C); c = t2 - n * C;
  }
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024) in a fixed
// order: shuffle tree inside each warp, then warp 0 adds the warp sums. The
// result is valid in thread 0. `smem` holds 32 values.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nw ? smem[lane] : Acc(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// Calls f(Tag<T>{}) with the storage type T that dt names.
template <typename T> struct Tag { using type = T; };
template <class F>
int dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(Tag<float>{});
    case DType::F64: return f(Tag<double>{});
    case DType::F16: return f(Tag<__half>{});
    case DType::BF16: return f(Tag<__nv_bfloat16>{});
  }
  return int(cudaErrorInvalidValue);
}

// Exact n / d for n, d < 2^31 by a multiply-high and a shift (Granlund-Montgomery,
// as torch's IntDivider): d > 0, n < 2^31.
struct FastDiv {
  uint32_t d = 1, m = 1, s = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t div) : d(div) {
    s = 0;
    while (s < 32 && (uint64_t(1) << s) < div) ++s;
    m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << s) - div)) / div + 1);
  }
  FL_HD __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(n, m);
#else
    const uint32_t t = uint32_t((uint64_t(n) * m) >> 32);
#endif
    return (t + n) >> s;
  }
};

}  // namespace fastlayers::cuda
