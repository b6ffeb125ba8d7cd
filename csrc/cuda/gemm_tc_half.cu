// Tensor-core GEMM (gemm_tc.cuh) instantiated for __half: one file per dtype so
// the two compile in parallel (gemm.cu declares them extern).
#include "gemm_tc.cuh"

namespace fastlayers::cuda {
template int gemm_tc<__half>(const GemmDesc& d, cudaStream_t stream);
}  // namespace fastlayers::cuda
