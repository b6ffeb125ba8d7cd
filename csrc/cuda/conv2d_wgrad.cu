// Conv2d weight gradient as implicit GEMM with a deterministic split-K
// (index map ConvWgrad in conv2d.cuh).
#include "conv2d.cuh"

namespace fastlayers::cuda {

int64_t conv2d_wgrad_workspace_bytes(const ConvDesc& d, DType dt) {
  if (d.groups <= 0) return 0;
  const int64_t Kg = d.K / d.groups, Cg = d.C / d.groups;
  return Kg > 0 && Cg * d.R * d.S > 0 ? plan_gemm(Kg, Cg * d.R * d.S, d.N * d.P * d.Q, d.groups, dt, conv_big_tiles(d, dt)).ws_bytes : 0;
}

int conv2d_wgrad(const ConvDesc& d, DType dt, const void* gy, const void* x, void* gw,
                 void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>)
      if (conv_index32(d))
        return run_gemm(ConvWgrad<T, int32_t>(d, gy, x, gw), d.groups, dt, workspace, stream);
    return run_gemm(ConvWgrad<T>(d, gy, x, gw), d.groups, dt, workspace, stream);
  });
}

}  // namespace fastlayers::cuda
