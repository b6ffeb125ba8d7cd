// MaxPool2d.
//  forward : one thread per output element (walked in the output's memory
//            order); writes the max and its compact offset r * kw + s inside
//            the window (uint8 or int32). Ties and NaN follow torch: the first
//            maximum wins, a NaN replaces the running max.
//  backward: one thread per INPUT element gathers grad_output from every window
//            that covers it and chose it (its stored offset points back at this
//            element). Fixed summation order, no atomics: deterministic.
//  indices : offsets -> torch's flat int64 indices h * W + w.
#include <cmath>

#include "common.cuh"

namespace fastlayers::cuda {
namespace {

constexpr int kPoolThreads = 256;

template <typename S, typename O>
__global__ void max_pool_fwd_kernel(PoolDesc d, const S* __restrict__ x, S* __restrict__ y,
                                    O* __restrict__ off) {
  using Acc = typename Num<S>::Acc;
  const int64_t total = d.N * d.C * d.P * d.Q;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, p, q;
    decode4(t, d.C, d.P, d.Q, d.out_channels_last, n, c, p, q);
    const S* xp = x + n * d.in_str[0] + c * d.in_str[1];
    const int64_t h0 = p * d.sh - d.ph, w0 = q * d.sw - d.pw;
    Acc best = Acc(-INFINITY);
    S best_s = Num<S>::from_acc(best);
    int64_t best_k = -1;
    for (int64_t r = 0; r < d.kh; ++r) {
      const int64_t h = h0 + r * d.dh;
      if (h < 0 || h >= d.H) continue;
      for (int64_t s = 0; s < d.kw; ++s) {
        const int64_t w = w0 + s * d.dw;
        if (w < 0 || w >= d.W) continue;
        const S vs = xp[h * d.in_str[2] + w * d.in_str[3]];
        const Acc v = Num<S>::to_acc(vs);
        if (best_k < 0 || v > best || isnan(v)) { best = v; best_s = vs; best_k = r * d.kw + s; }
      }
    }
    y[n * d.out_str[0] + c * d.out_str[1] + p * d.out_str[2] + q * d.out_str[3]] = best_s;
    off[n * d.off_str[0] + c * d.off_str[1] + p * d.off_str[2] + q * d.off_str[3]] =
        O(best_k < 0 ? 0 : best_k);
  }
}

template <typename S, typename O>
__global__ void max_pool_bwd_kernel(PoolDesc d, const S* __restrict__ gy,
                                    const O* __restrict__ off, S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  const int64_t total = d.N * d.C * d.H * d.W;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w;
    decode4(t, d.C, d.H, d.W, d.in_channels_last, n, c, h, w);
    const O* op = off + n * d.off_str[0] + c * d.off_str[1];
    const S* gp = gy + n * d.out_str[0] + c * d.out_str[1];
    Acc sum = Acc(0);
    for (int64_t r = 0; r < d.kh; ++r) {
      const int64_t th = h + d.ph - r * d.dh;   // = p * sh for the window row p
      if (th < 0) break;                        // decreasing in r
      const int64_t p = divq(th, d.sh);
      if (p * d.sh != th || p >= d.P) continue;
      for (int64_t s = 0; s < d.kw; ++s) {
        const int64_t tw = w + d.pw - s * d.dw;
        if (tw < 0) break;
        const int64_t q = divq(tw, d.sw);
        if (q * d.sw != tw || q >= d.Q) continue;
        if (int64_t(op[p * d.off_str[2] + q * d.off_str[3]]) == r * d.kw + s)
          sum += Num<S>::to_acc(gp[p * d.out_str[2] + q * d.out_str[3]]);
      }
    }
    gx[n * d.in_str[0] + c * d.in_str[1] + h * d.in_str[2] + w * d.in_str[3]] =
        Num<S>::from_acc(sum);
  }
}

template <typename O>
__global__ void max_pool_indices_kernel(PoolDesc d, const O* __restrict__ off,
                                        int64_t* __restrict__ idx) {
  const int64_t total = d.N * d.C * d.P * d.Q;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, p, q;
    decode4(t, d.C, d.P, d.Q, d.out_channels_last, n, c, p, q);
    const int64_t k = int64_t(off[n * d.off_str[0] + c * d.off_str[1] + p * d.off_str[2] +
                                  q * d.off_str[3]]);
    const int64_t r = divq(k, d.kw), s = k - r * d.kw;
    const int64_t h = p * d.sh - d.ph + r * d.dh, w = q * d.sw - d.pw + s * d.dw;
    idx[n * d.out_str[0] + c * d.out_str[1] + p * d.out_str[2] + q * d.out_str[3]] = h * d.W + w;
  }
}

}  // namespace

int max_pool2d_forward(const PoolDesc& d, DType dt, const void* x, void* y, void* offsets,
                       bool offsets_int32, cudaStream_t stream) {
  const int64_t total = d.N * d.C * d.P * d.Q;
  if (total <= 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const unsigned grid = grid_for(total, kPoolThreads);
    if (offsets_int32)
      max_pool_fwd_kernel<S, int32_t><<<grid, kPoolThreads, 0, stream>>>(
          d, static_cast<const S*>(x), static_cast<S*>(y), static_cast<int32_t*>(offsets));
    else
      max_pool_fwd_kernel<S, uint8_t><<<grid, kPoolThreads, 0, stream>>>(
          d, static_cast<const S*>(x), static_cast<S*>(y), static_cast<uint8_t*>(offsets));
    return last_error();
  });
}

int max_pool2d_backward(const PoolDesc& d, DType dt, const void* gy, const void* offsets,
                        bool offsets_int32, void* gx, cudaStream_t stream) {
  const int64_t total = d.N * d.C * d.H * d.W;
  if (total <= 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const unsigned grid = grid_for(total, kPoolThreads);
    if (offsets_int32)
      max_pool_bwd_kernel<S, int32_t><<<grid, kPoolThreads, 0, stream>>>(
          d, static_cast<const S*>(gy), static_cast<const int32_t*>(offsets), static_cast<S*>(gx));
    else
      max_pool_bwd_kernel<S, uint8_t><<<grid, kPoolThreads, 0, stream>>>(
          d, static_cast<const S*>(gy), static_cast<const uint8_t*>(offsets), static_cast<S*>(gx));
    return last_error();
  });
}

int max_pool2d_indices(const PoolDesc& d, const void* offsets, bool offsets_int32,
                       int64_t* indices, cudaStream_t stream) {
  const int64_t total = d.N * d.C * d.P * d.Q;
  if (total <= 0) return 0;
  const unsigned grid = grid_for(total, kPoolThreads);
  if (offsets_int32)
    max_pool_indices_kernel<int32_t><<<grid, kPoolThreads, 0, stream>>>(
        d, static_cast<const int32_t*>(offsets), indices);
  else
    max_pool_indices_kernel<uint8_t><<<grid, kPoolThreads, 0, stream>>>(
        d, static_cast<const uint8_t*>(offsets), indices);
  return last_error();
}

}  // namespace fastlayers::cuda
