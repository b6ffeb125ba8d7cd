// Conv2d input gradient as implicit GEMM (index map ConvDgradT in conv2d.cuh; the unit-stride
// case splits the grad_output offsets like the forward input gather).
#include "conv2d.cuh"

namespace fastlayers::cuda {

int64_t conv2d_dgrad_workspace_bytes(const ConvDesc& d, DType dt) {
  if (d.groups <= 0) return 0;
  const int64_t Kg = d.K / d.groups, Cg = d.C / d.groups;
  return d.N * d.H * d.W > 0 && Cg > 0 ? plan_gemm(Cg, d.N * d.H * d.W, Kg * d.R * d.S, d.groups, dt,
                                                   conv_big_tiles(d, dt) && d.stride_h == 1 && d.stride_w == 1).ws_bytes : 0;
}

int conv2d_dgrad(const ConvDesc& d, DType dt, const void* gy, const void* w, void* gx,
                 void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool unit = d.stride_h == 1 && d.stride_w == 1;
    if constexpr (std::is_same_v<T, float>)
      if (unit && conv_index32(d))
        return run_gemm(ConvDgradT<T, true, int32_t>(d, gy, w, gx), d.groups, dt, workspace, stream);
    if (unit)
      return run_gemm(ConvDgradT<T, true>(d, gy, w, gx), d.groups, dt, workspace, stream);
    return run_gemm(ConvDgradT<T, false>(d, gy, w, gx), d.groups, dt, workspace, stream);
  });
}

}  // namespace fastlayers::cuda
