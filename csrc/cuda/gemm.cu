// Plain strided GEMM (Linear forward/backward) and the per-channel sum used
// for bias gradients. The tiled kernels themselves live in gemm_kernels.cuh.
#include <cstdlib>

#include "gemm_kernels.cuh"
#include "gemm_tc.cuh"

namespace fastlayers::cuda {
// Compiled in gemm_tc_half.cu / gemm_tc_bf16.cu.
extern template int gemm_tc<__half>(const GemmDesc& d, cudaStream_t stream);
extern template int gemm_tc<__nv_bfloat16>(const GemmDesc& d, cudaStream_t stream);
// Compiled in gemm_wgmma.cu (sm_90a wgmma, A and B K-contiguous); -1: not applicable.
template <typename S> int gemm_wgmma(const GemmDesc& d, cudaStream_t stream);
extern template int gemm_wgmma<__half>(const GemmDesc& d, cudaStream_t stream);
extern template int gemm_wgmma<__nv_bfloat16>(const GemmDesc& d, cudaStream_t stream);
bool gemm_wgmma_ok(const GemmDesc& d);
}  // namespace fastlayers::cuda

namespace fastlayers::cuda {

const char* error_string(int code) { return cudaGetErrorString(cudaError_t(code)); }

namespace {

// C(i, j) = A(i, :) . B(:, j) with arbitrary element strides, plus the
// epilogue: accumulate into C and/or add a per-row / per-column bias.
template <typename S>
struct StridedGemm {
  using T = S;
  using AOp = MatOp<S>;
  using BOp = MatOp<S>;
  static constexpr bool kBigTiles = true;
  static constexpr bool kLightOperands = true;   // few registers per operand row
  int64_t M, N, K;
  bool a_k_fast, b_k_fast;
  const S* A; int64_t rsA, csA;
  const S* B; int64_t rsB, csB;
  S* c; int64_t rsC, csC;
  bool accumulate;
  const S* bias_m;
  const S* bias_n;

  FL_HD AOp a_op(int) const { return {A, rsA, csA}; }
  FL_HD BOp b_op(int) const { return {B, csB, rsB}; }
  FL_HD int64_t c_row(int, int64_t i) const { return i * rsC; }
  FL_HD int64_t c_col(int, int64_t j) const { return j * csC; }
};

// Grids have at most 65535 row tiles: a very tall product is computed as the
// transpose C^T = B^T . A^T instead (same values, different tile order).
GemmDesc orient(const GemmDesc& d) {
  if (ceil_div(d.M, 64) <= 65535) return d;
  GemmDesc t = d;
  t.M = d.N; t.N = d.M;
  t.A = d.B; t.rsA = d.csB; t.csA = d.rsB;
  t.B = d.A; t.rsB = d.csA; t.csB = d.rsA;
  t.rsC = d.csC; t.csC = d.rsC;
  t.bias_m = d.bias_n; t.bias_n = d.bias_m;
  return t;
}

template <typename S>
StridedGemm<S> make_problem(const GemmDesc& d) {
  StridedGemm<S> p;
  p.M = d.M; p.N = d.N; p.K = d.K;
  p.a_k_fast = std::llabs(d.csA) < std::llabs(d.rsA);
  p.b_k_fast = std::llabs(d.rsB) < std::llabs(d.csB);
  p.A = static_cast<const S*>(d.A); p.rsA = d.rsA; p.csA = d.csA;
  p.B = static_cast<const S*>(d.B); p.rsB = d.rsB; p.csB = d.csB;
  p.c = static_cast<S*>(d.C); p.rsC = d.rsC; p.csC = d.csC;
  p.accumulate = d.accumulate;
  p.bias_m = static_cast<const S*>(d.bias_m);
  p.bias_n = static_cast<const S*>(d.bias_n);
  return p;
}

}  // namespace

int64_t gemm_workspace_bytes(const GemmDesc& desc, DType dt) {
  // gemm_wgmma / gemm_tc: no split-K.
  if ((dt == DType::F16 || dt == DType::BF16) && (gemm_wgmma_ok(desc) || gemm_tc_ok(desc))) return 0;
  const GemmDesc d = orient(desc);
  if (d.M <= 0 || d.N <= 0) return 0;
  return plan_gemm(d.M, d.N, d.K, 1, dt).ws_bytes;
}

int gemm(const GemmDesc& desc, DType dt, void* workspace, cudaStream_t stream) {
  // float16 / bfloat16: wgmma kernel (Hopper, both operands K-contiguous), else
  // the mma.sync kernel, when the layout qualifies (-1: it does not).
  if (dt == DType::F16 || dt == DType::BF16) {
    int r = dt == DType::F16 ? gemm_wgmma<__half>(desc, stream)
                             : gemm_wgmma<__nv_bfloat16>(desc, stream);
    if (r != -1) return r;
    r = dt == DType::F16 ? gemm_tc<__half>(desc, stream) : gemm_tc<__nv_bfloat16>(desc, stream);
    if (r != -1) return r;
  }
  const GemmDesc d = orient(desc);
  switch (dt) {
    case DType::F32: return run_gemm(make_problem<float>(d), 1, dt, workspace, stream);
    case DType::F64: return run_gemm(make_problem<double>(d), 1, dt, workspace, stream);
    case DType::F16: return run_gemm(make_problem<__half>(d), 1, dt, workspace, stream);
    case DType::BF16: return run_gemm(make_problem<__nv_bfloat16>(d), 1, dt, workspace, stream);
  }
  return int(cudaErrorInvalidValue);
}

// ---- per-channel sum -----------------------------------------------------------
// Block (c, split) sums its contiguous range of the N*S items of channel c;
// channel_sum_finish adds the splits in order.
namespace {

constexpr int kSumThreads = 256;

int64_t sum_splits(int64_t N, int64_t C, int64_t S) {
  const int64_t items = N * S;
  int64_t sp = ceil_div(528, C > 0 ? C : 1);
  const int64_t by_size = ceil_div(items, 4096);
  if (sp > by_size) sp = by_size;
  if (sp < 1) sp = 1;
  return sp;
}

template <typename S>
__global__ void channel_sum_partial(const S* x, int64_t N, int64_t C, int64_t Sz, int64_t sN,
                                    int64_t sC, int64_t sS, int64_t chunk,
                                    typename Num<S>::Acc* part) {
  using Acc = typename Num<S>::Acc;
  __shared__ Acc smem[32];
  const int64_t c = blockIdx.x, sp = blockIdx.y, items = N * Sz;
  const int64_t q0 = sp * chunk, q1 = q0 + chunk < items ? q0 + chunk : items;
  Acc v = Acc(0);
  for (int64_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const int64_t n = divq(q, Sz), s = q - n * Sz;
    v += Num<S>::to_acc(x[n * sN + c * sC + s * sS]);
  }
  v = block_sum(v, smem);
  if (threadIdx.x == 0) part[c * gridDim.y + sp] = v;
}

template <typename S>
__global__ void channel_sum_finish(const typename Num<S>::Acc* part, int64_t C, int64_t splits,
                                   S* out) {
  using Acc = typename Num<S>::Acc;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    Acc v = Acc(0);
    for (int64_t k = 0; k < splits; ++k) v += part[c * splits + k];
    out[c] = Num<S>::from_acc(v);
  }
}

template <typename S>
int channel_sum_typed(const void* x, int64_t N, int64_t C, int64_t Sz, int64_t sN, int64_t sC,
                      int64_t sS, void* out, void* ws, cudaStream_t stream) {
  using Acc = typename Num<S>::Acc;
  if (C <= 0) return 0;
  if (C > 2147483647LL) return int(cudaErrorInvalidConfiguration);
  const int64_t splits = sum_splits(N, C, Sz);
  const int64_t chunk = ceil_div(N * Sz, splits);
  Acc* part = static_cast<Acc*>(ws);
  channel_sum_partial<S><<<dim3(unsigned(C), unsigned(splits)), kSumThreads, 0, stream>>>(
      static_cast<const S*>(x), N, C, Sz, sN, sC, sS, chunk, part);
  int err = last_error();
  if (err) return err;
  channel_sum_finish<S><<<grid_for(C, 256), 256, 0, stream>>>(part, C, splits,
                                                                static_cast<S*>(out));
  return last_error();
}

}  // namespace

int64_t channel_sum_workspace_bytes(int64_t N, int64_t C, int64_t S, DType dt) {
  return C * sum_splits(N, C, S) * (dt == DType::F64 ? 8 : 4);
}

int channel_sum(const void* x, DType dt, int64_t N, int64_t C, int64_t S, int64_t sN,
                int64_t sC, int64_t sS, void* out, void* workspace, cudaStream_t stream) {
  switch (dt) {
    case DType::F32: return channel_sum_typed<float>(x, N, C, S, sN, sC, sS, out, workspace, stream);
    case DType::F64: return channel_sum_typed<double>(x, N, C, S, sN, sC, sS, out, workspace, stream);
    case DType::F16: return channel_sum_typed<__half>(x, N, C, S, sN, sC, sS, out, workspace, stream);
    case DType::BF16:
      return channel_sum_typed<__nv_bfloat16>(x, N, C, S, sN, sC, sS, out, workspace, stream);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace fastlayers::cuda
