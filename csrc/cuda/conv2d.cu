// Conv2d forward as implicit GEMM (index map ConvFwd in conv2d.cuh).
#include "conv2d.cuh"

namespace fastlayers::cuda {

int64_t conv2d_forward_workspace_bytes(const ConvDesc& d, DType dt) {
  if (d.groups <= 0) return 0;
  const int64_t Kg = d.K / d.groups, Cg = d.C / d.groups;
  return d.N * d.P * d.Q > 0 && Kg > 0 ? plan_gemm(Kg, d.N * d.P * d.Q, Cg * d.R * d.S, d.groups, dt, conv_big_tiles(d, dt)).ws_bytes : 0;
}

int conv2d_forward(const ConvDesc& d, DType dt, const void* x, const void* w, const void* bias,
                   void* y, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (std::is_same_v<T, float>)
      if (conv_index32(d))
        return run_gemm(ConvFwd<T, int32_t>(d, x, w, bias, y), d.groups, dt, workspace, stream);
    return run_gemm(ConvFwd<T>(d, x, w, bias, y), d.groups, dt, workspace, stream);
  });
}

}  // namespace fastlayers::cuda
