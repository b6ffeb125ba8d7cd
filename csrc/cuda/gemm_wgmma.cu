// wgmma GEMM (gemm_wgmma.cuh) instantiated for __half and __nv_bfloat16. Its
// device code is only compiled for sm_90a: setup.py adds
// -gencode arch=compute_90a,code=sm_90a when the arch list has 9.0.
#include "gemm_wgmma.cuh"

namespace fastlayers::cuda {
template int gemm_wgmma<__half>(const GemmDesc& d, cudaStream_t stream);
template int gemm_wgmma<__nv_bfloat16>(const GemmDesc& d, cudaStream_t stream);
bool gemm_wgmma_ok(const GemmDesc& d) { return gemm_wgmma_ok_impl(d); }
}  // namespace fastlayers::cuda
