// Conv2d input gradient as implicit GEMM (index map ConvDgradT in conv2d.cuh; the unit-stride
// case splits the grad_output offsets like the forward input gather). The half and
// bfloat16 instances are compiled in conv2d_dgrad_f16.cu and conv2d_dgrad_bf16.cu.
#include "conv2d.cuh"

namespace fastlayers::cuda {

extern template FL_CONV_DGRAD_INSTANCE(__half);
extern template FL_CONV_DGRAD_INSTANCE(__nv_bfloat16);

int64_t conv2d_dgrad_workspace_bytes(const ConvDesc& d, DType dt) {
  if (d.groups <= 0) return 0;
  const int64_t Kg = d.K / d.groups, Cg = d.C / d.groups;
  return d.N * d.H * d.W > 0 && Cg > 0 ? plan_gemm(Cg, d.N * d.H * d.W, Kg * d.R * d.S, d.groups, dt,
                                                   conv_big_tiles(d, dt) && d.stride_h == 1 && d.stride_w == 1).ws_bytes : 0;
}

int conv2d_dgrad(const ConvDesc& d, DType dt, const void* gy, const void* w, void* gx,
                 void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    return run_conv2d_dgrad<typename decltype(tag)::type>(d, dt, gy, w, gx, workspace, stream);
  });
}

}  // namespace fastlayers::cuda
