// Host-side entry points of the fastlayers CUDA kernels (csrc/cuda/*.cu).
//
// Plain C++: no torch and no CUDA headers, so the torch glue (glue.cpp) can
// include it while being compiled against a CPU-only torch. Every launcher
// takes raw device pointers, int64 sizes/strides (in elements), a dtype tag
// and the stream; it enqueues work and returns 0 or a cudaError_t code
// (error_string() turns it into text). Nothing is synchronised.
//
// 4-D tensors are described by their sizes plus 4 element strides
// (N, C, H, W order), so NCHW and channels_last both work without copies.
#pragma once
#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace fastlayers::cuda {

// Storage type of tensors. Accumulation is float32 for F32/F16/BF16 and
// float64 for F64.
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

const char* error_string(int code);

// ---- GEMM (gemm.cu) ---------------------------------------------------------
// C = (accumulate ? C : 0) + A . B (+ bias_m[i] per row) (+ bias_n[j] per column)
// A: M x K, B: K x N, C: M x N; element (i, j) of X at X[i * rsX + j * csX].
// All of A, B, C, bias have dtype `dt`. F32/F64: SIMT tiles; F16/BF16: tensor
// cores (WMMA), fp32 accumulation. When K is long and there are few output
// tiles, K is split and the partial sums (in the accumulation type) are summed
// in a fixed order by a second kernel: deterministic, no atomics.
struct GemmDesc {
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr; int64_t rsA = 0, csA = 0;
  const void* B = nullptr; int64_t rsB = 0, csB = 0;
  void* C = nullptr;       int64_t rsC = 0, csC = 0;
  bool accumulate = false;
  const void* bias_m = nullptr;
  const void* bias_n = nullptr;
};
// Bytes of scratch `gemm` needs (0 when K is not split). Depends only on the shape.
int64_t gemm_workspace_bytes(const GemmDesc& d, DType dt);
int gemm(const GemmDesc& d, DType dt, void* workspace, cudaStream_t stream);

// Sum over rows: out[c] = sum_{n < N, s < S} x[n*sN + c*sC + s*sS], c < C.
// Fixed-order reduction (bias gradients). out has dtype `dt`, contiguous.
// Needs workspace_bytes from channel_sum_workspace_bytes.
int64_t channel_sum_workspace_bytes(int64_t N, int64_t C, int64_t S, DType dt);
int channel_sum(const void* x, DType dt, int64_t N, int64_t C, int64_t S, int64_t sN,
                int64_t sC, int64_t sS, void* out, void* workspace, cudaStream_t stream);

// ---- Conv2d (conv2d.cu): implicit GEMM, any strides -----------------------------
struct ConvDesc {
  int64_t N = 0, C = 0, H = 0, W = 0;      // input
  int64_t K = 0, R = 0, S = 0;             // output channels, kernel height/width
  int64_t P = 0, Q = 0;                    // output height/width
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int64_t groups = 1;
  int64_t x_str[4] = {0, 0, 0, 0};         // input / grad_input strides
  int64_t w_str[4] = {0, 0, 0, 0};         // weight / grad_weight strides  [K, C/groups, R, S]
  int64_t y_str[4] = {0, 0, 0, 0};         // output / grad_output strides
};
// y = conv(x, w) (+ bias[K]).
int64_t conv2d_forward_workspace_bytes(const ConvDesc& d, DType dt);
int conv2d_forward(const ConvDesc& d, DType dt, const void* x, const void* w, const void* bias,
                   void* y, void* workspace, cudaStream_t stream);
// grad_input (written to x with x_str) from grad_output (y) and weight (w).
int64_t conv2d_dgrad_workspace_bytes(const ConvDesc& d, DType dt);
int conv2d_dgrad(const ConvDesc& d, DType dt, const void* gy, const void* w, void* gx,
                 void* workspace, cudaStream_t stream);
// grad_weight (written to w with w_str) from grad_output (y) and input (x).
int64_t conv2d_wgrad_workspace_bytes(const ConvDesc& d, DType dt);
int conv2d_wgrad(const ConvDesc& d, DType dt, const void* gy, const void* x, void* gw,
                 void* workspace, cudaStream_t stream);

// ---- MaxPool2d (max_pool2d.cu) -----------------------------------------------
struct PoolDesc {
  int64_t N = 0, C = 0, H = 0, W = 0, P = 0, Q = 0;   // input H x W, output P x Q
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t in_str[4] = {0, 0, 0, 0};                   // input / grad_input strides
  int64_t out_str[4] = {0, 0, 0, 0};                  // output, offsets, grad_output strides
  int64_t off_str[4] = {0, 0, 0, 0};                  // offsets strides
  bool out_channels_last = false;  // walk outputs in NHWC order (coalescing only)
  bool in_channels_last = false;   // walk inputs in NHWC order (coalescing only)
};
// offsets (kr * kw + kc within the window): uint8 when offsets_int32 is false.
int max_pool2d_forward(const PoolDesc& d, DType dt, const void* x, void* y, void* offsets,
                       bool offsets_int32, cudaStream_t stream);
// grad_input gathered per input element (no atomics); fully overwrites gx.
int max_pool2d_backward(const PoolDesc& d, DType dt, const void* gy, const void* offsets,
                        bool offsets_int32, void* gx, cudaStream_t stream);
// int64 flat indices h * W + w (strides out_str for the result, off_str for offsets).
int max_pool2d_indices(const PoolDesc& d, const void* offsets, bool offsets_int32,
                       int64_t* indices, cudaStream_t stream);

// ---- BatchNorm (batch_norm.cu) -----------------------------------------------
// Input (N, C, S) with element (n, c, s) at n*sN + c*sC + s*sS; the input and
// every same-shaped tensor (out, grad_output, grad_input) share these strides
// and are dense in memory (NC* or channels-last order; channels_last says which).
// Per-channel tensors (weight, bias, running stats, mean, invstd, grads of
// weight/bias) have their own dtype tag pdt (the input dtype, or F32 for F16/BF16
// inputs); save_mean/save_invstd are in the accumulation type (F64 for F64
// input, else F32). Null weight/bias mean 1/0; null running stats are skipped.
struct BNDesc {
  int64_t N = 0, C = 0, S = 0, sN = 0, sC = 0, sS = 0;
  bool channels_last = false;
};
int64_t batch_norm_workspace_bytes(const BNDesc& d, DType dt);
int batch_norm_train(const BNDesc& d, DType dt, DType pdt, const void* x, const void* weight,
                     const void* bias, void* running_mean, void* running_var, double momentum,
                     double eps, void* y, void* save_mean, void* save_invstd, void* workspace,
                     cudaStream_t stream);
// mean/var dtype pdt; scratch: workspace of batch_norm_workspace_bytes.
int batch_norm_eval(const BNDesc& d, DType dt, DType pdt, const void* x, const void* weight,
                    const void* bias, const void* running_mean, const void* running_var,
                    double eps, void* y, void* workspace, cudaStream_t stream);
// mean/invstd have dtype mdt. training: gradient through the batch statistics;
// else the affine map only. gx/gw/gb may be null (not asked for). gw/gb dtype pdt.
int batch_norm_backward(const BNDesc& d, DType dt, DType pdt, DType mdt, const void* gy,
                        const void* x, const void* weight, const void* mean,
                        const void* invstd, bool training, void* gx, void* gw, void* gb,
                        void* workspace, cudaStream_t stream);

}  // namespace fastlayers::cuda
