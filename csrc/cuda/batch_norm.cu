// BatchNorm over dim 1 of an (N, C, S) view (S = product of the trailing dims).
//  train   : bn_stats_partial  block (c, split): Welford (count, mean, M2) over
//                               its contiguous share of the N*S items, merged
//                               across the block in a fixed order;
//            bn_stats_finalize one thread per channel merges the splits in
//                               order (in double), writes save_mean/save_invstd,
//                               updates the running stats (unbiased var) and the
//                               per-channel coefficients;
//            bn_apply          y = (x - mean) * (w * invstd) + b, elementwise.
//  eval    : coefficients from the running stats, then bn_apply.
//  backward: bn_bwd_partial / bn_bwd_finalize reduce sum(dy) and
//            sum(dy * (x - mean)) the same way, then bn_bwd_apply computes
//            dx = w*invstd * (dy - sum(dy)/M - (x - mean) * invstd^2 * sum(dy*(x-mean))/M)
//            (training) or dx = w*invstd * dy (eval).
// fp16/bf16 data use fp32 statistics; float64 data use float64. No atomics:
// results are bitwise reproducible.
#include <cmath>

#include "common.cuh"

namespace fastlayers::cuda {
namespace {

constexpr int kBNThreads = 256;

int64_t bn_splits(const BNDesc& d) {
  int64_t sp = ceil_div(528, d.C > 0 ? d.C : 1);
  const int64_t by_size = ceil_div(d.N * d.S, 4096);
  if (sp > by_size) sp = by_size;
  if (sp < 1) sp = 1;
  return sp;
}


// Merges (nb, mb, m2b) into (na, ma, m2a).
template <typename Acc>
__device__ __forceinline__ void welford_merge(Acc& na, Acc& ma, Acc& m2a, Acc nb, Acc mb, Acc m2b) {
  const Acc n = na + nb;
  if (nb == Acc(0)) return;
  if (na == Acc(0)) { na = nb; ma = mb; m2a = m2b; return; }
  const Acc delta = mb - ma, fb = nb / n;
  ma = ma + delta * fb;
  m2a = m2a + m2b + delta * delta * na * fb;
  na = n;
}

template <typename S>
__global__ void bn_stats_partial(BNDesc d, const S* __restrict__ x, int64_t chunk,
                                 typename Num<S>::Acc* __restrict__ part) {
  using Acc = typename Num<S>::Acc;
  __shared__ Acc sh[3][32];
  const int64_t c = blockIdx.x, sp = blockIdx.y, items = d.N * d.S;
  const int64_t q0 = sp * chunk, q1 = q0 + chunk < items ? q0 + chunk : items;
  Acc n = 0, mean = 0, m2 = 0;
  for (int64_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const int64_t in = divq(q, d.S), s = q - in * d.S;
    const Acc v = Num<S>::to_acc(x[in * d.sN + c * d.sC + s * d.sS]);
    n += Acc(1);
    const Acc delta = v - mean;
    mean += delta / n;
    m2 += delta * (v - mean);
  }
  // Fixed-order tree: shuffles inside the warp, then warp 0 over the warps.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Acc nb = __shfl_down_sync(0xffffffffu, n, o);
    const Acc mb = __shfl_down_sync(0xffffffffu, mean, o);
    const Acc m2b = __shfl_down_sync(0xffffffffu, m2, o);
    welford_merge(n, mean, m2, nb, mb, m2b);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  if (lane == 0) { sh[0][warp] = n; sh[1][warp] = mean; sh[2][warp] = m2; }
  __syncthreads();
  if (warp == 0) {
    n = lane < nw ? sh[0][lane] : Acc(0);
    mean = lane < nw ? sh[1][lane] : Acc(0);
    m2 = lane < nw ? sh[2][lane] : Acc(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const Acc nb = __shfl_down_sync(0xffffffffu, n, o);
      const Acc mb = __shfl_down_sync(0xffffffffu, mean, o);
      const Acc m2b = __shfl_down_sync(0xffffffffu, m2, o);
      welford_merge(n, mean, m2, nb, mb, m2b);
    }
    if (lane == 0) {
      Acc* o = part + (c * gridDim.y + sp) * 3;
      o[0] = n; o[1] = mean; o[2] = m2;
    }
  }
}

// coef layout: [3][C] Acc: mean, scale = w * invstd, beta = b.
template <typename Acc>
__global__ void bn_stats_finalize(BNDesc d, DType pdt, const Acc* __restrict__ part,
                                  int64_t splits, const void* weight, const void* bias,
                                  void* running_mean, void* running_var, double momentum,
                                  double eps, Acc* save_mean, Acc* save_invstd, Acc* coef) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d.C;
       c += int64_t(gridDim.x) * blockDim.x) {
    double n = 0, mean = 0, m2 = 0;
    for (int64_t k = 0; k < splits; ++k) {
      const Acc* p = part + (c * splits + k) * 3;
      welford_merge<double>(n, mean, m2, double(p[0]), double(p[1]), double(p[2]));
    }
    const double var = n > 0 ? m2 / n : NAN;
    const double invstd = 1.0 / sqrt(var + eps);
    save_mean[c] = Acc(mean);
    save_invstd[c] = Acc(invstd);
    if (running_mean) {
      const double rm = load_any<double>(running_mean, pdt, c);
      store_any<double>(running_mean, pdt, c, (1.0 - momentum) * rm + momentum * mean);
    }
    if (running_var) {
      const double rv = load_any<double>(running_var, pdt, c);
      const double unbiased = m2 / (n - 1.0);
      store_any<double>(running_var, pdt, c, (1.0 - momentum) * rv + momentum * unbiased);
    }
    const Acc mw = weight ? load_any<Acc>(weight, pdt, c) : Acc(1);
    coef[c] = Acc(mean);
    coef[d.C + c] = mw * Acc(invstd);
    coef[2 * d.C + c] = bias ? load_any<Acc>(bias, pdt, c) : Acc(0);
  }
}

template <typename Acc>
__global__ void bn_eval_coef(BNDesc d, DType pdt, const void* weight, const void* bias,
                             const void* running_mean, const void* running_var, double eps,
                             Acc* coef) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d.C;
       c += int64_t(gridDim.x) * blockDim.x) {
    const Acc invstd = Acc(1.0 / sqrt(load_any<double>(running_var, pdt, c) + eps));
    coef[c] = load_any<Acc>(running_mean, pdt, c);
    coef[d.C + c] = (weight ? load_any<Acc>(weight, pdt, c) : Acc(1)) * invstd;
    coef[2 * d.C + c] = bias ? load_any<Acc>(bias, pdt, c) : Acc(0);
  }
}

// Channel of the element at memory position t of a dense (N, C, S) tensor.
__device__ __forceinline__ int64_t channel_of(const BNDesc& d, int64_t t) {
  if (d.channels_last) return t - divq(t, d.C) * d.C;
  const int64_t u = divq(t, d.S);
  return u - divq(u, d.C) * d.C;
}

template <typename S>
__global__ void bn_apply(BNDesc d, const S* __restrict__ x, const typename Num<S>::Acc* coef,
                         S* __restrict__ y) {
  using Acc = typename Num<S>::Acc;
  const int64_t total = d.N * d.C * d.S;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(d, t);
    const Acc v = Num<S>::to_acc(x[t]);
    y[t] = Num<S>::from_acc((v - coef[c]) * coef[d.C + c] + coef[2 * d.C + c]);
  }
}

template <typename S>
__global__ void bn_bwd_partial(BNDesc d, DType mdt, const S* __restrict__ gy,
                               const S* __restrict__ x, const void* mean, int64_t chunk,
                               typename Num<S>::Acc* __restrict__ part) {
  using Acc = typename Num<S>::Acc;
  __shared__ Acc sh[32];
  const int64_t c = blockIdx.x, sp = blockIdx.y, items = d.N * d.S;
  const int64_t q0 = sp * chunk, q1 = q0 + chunk < items ? q0 + chunk : items;
  const Acc mu = load_any<Acc>(mean, mdt, c);
  Acc sdy = 0, sdyx = 0;
  for (int64_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const int64_t in = divq(q, d.S), s = q - in * d.S;
    const int64_t o = in * d.sN + c * d.sC + s * d.sS;
    const Acc g = Num<S>::to_acc(gy[o]);
    sdy += g;
    sdyx += g * (Num<S>::to_acc(x[o]) - mu);
  }
  sdy = block_sum(sdy, sh);
  sdyx = block_sum(sdyx, sh);
  if (threadIdx.x == 0) {
    Acc* o = part + (c * gridDim.y + sp) * 2;
    o[0] = sdy; o[1] = sdyx;
  }
}

// coef layout: [4][C] Acc: mean, a = w * invstd, k1, k2 (dx = a*(dy - k1 - (x-mean)*k2)).
template <typename Acc>
__global__ void bn_bwd_finalize(BNDesc d, DType pdt, DType mdt, const Acc* __restrict__ part,
                                int64_t splits, const void* weight, const void* mean,
                                const void* invstd, bool training, bool have_sums, void* gw,
                                void* gb, Acc* coef) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d.C;
       c += int64_t(gridDim.x) * blockDim.x) {
    double sdy = 0, sdyx = 0;
    if (have_sums)
      for (int64_t k = 0; k < splits; ++k) {
        sdy += double(part[(c * splits + k) * 2]);
        sdyx += double(part[(c * splits + k) * 2 + 1]);
      }
    const double is = load_any<double>(invstd, mdt, c);
    if (gw) store_any<double>(gw, pdt, c, sdyx * is);
    if (gb) store_any<double>(gb, pdt, c, sdy);
    const double w = weight ? load_any<double>(weight, pdt, c) : 1.0;
    const double M = double(d.N * d.S);
    coef[c] = load_any<Acc>(mean, mdt, c);
    coef[d.C + c] = Acc(w * is);
    coef[2 * d.C + c] = training ? Acc(sdy / M) : Acc(0);
    coef[3 * d.C + c] = training ? Acc(is * is * sdyx / M) : Acc(0);
  }
}

template <typename S>
__global__ void bn_bwd_apply(BNDesc d, const S* __restrict__ gy, const S* __restrict__ x,
                             const typename Num<S>::Acc* coef, S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  const int64_t total = d.N * d.C * d.S;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(d, t);
    const Acc g = Num<S>::to_acc(gy[t]);
    const Acc xm = Num<S>::to_acc(x[t]) - coef[c];
    gx[t] = Num<S>::from_acc(coef[d.C + c] * (g - coef[2 * d.C + c] - xm * coef[3 * d.C + c]));
  }
}

}  // namespace

int64_t batch_norm_workspace_bytes(const BNDesc& d, DType dt) {
  const int64_t acc = dt == DType::F64 ? 8 : 4;
  return (d.C * bn_splits(d) * 3 + 4 * d.C) * acc;
}

int batch_norm_train(const BNDesc& d, DType dt, DType pdt, const void* x, const void* weight,
                     const void* bias, void* running_mean, void* running_var, double momentum,
                     double eps, void* y, void* save_mean, void* save_invstd, void* workspace,
                     cudaStream_t stream) {
  if (d.C <= 0) return 0;
  if (d.C > 2147483647LL) return int(cudaErrorInvalidConfiguration);
  return dispatch_dtype(dt, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using Acc = typename Num<S>::Acc;
    const int64_t splits = bn_splits(d), chunk = ceil_div(d.N * d.S, splits);
    Acc* part = static_cast<Acc*>(workspace);
    Acc* coef = part + d.C * splits * 3;
    bn_stats_partial<S><<<dim3(unsigned(d.C), unsigned(splits)), kBNThreads, 0, stream>>>(
        d, static_cast<const S*>(x), chunk, part);
    int err = last_error();
    if (err) return err;
    bn_stats_finalize<Acc><<<grid_for(d.C, 128), 128, 0, stream>>>(
        d, pdt, part, splits, weight, bias, running_mean, running_var, momentum, eps,
        static_cast<Acc*>(save_mean), static_cast<Acc*>(save_invstd), coef);
    if ((err = last_error())) return err;
    const int64_t total = d.N * d.C * d.S;
    if (total > 0)
      bn_apply<S><<<grid_for(total, 256), 256, 0, stream>>>(d, static_cast<const S*>(x), coef,
                                                           static_cast<S*>(y));
    return last_error();
  });
}

int batch_norm_eval(const BNDesc& d, DType dt, DType pdt, const void* x, const void* weight,
                    const void* bias, const void* running_mean, const void* running_var,
                    double eps, void* y, void* workspace, cudaStream_t stream) {
  if (d.C <= 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using Acc = typename Num<S>::Acc;
    Acc* coef = static_cast<Acc*>(workspace);
    bn_eval_coef<Acc><<<grid_for(d.C, 128), 128, 0, stream>>>(d, pdt, weight, bias, running_mean,
                                                              running_var, eps, coef);
    int err = last_error();
    if (err) return err;
    const int64_t total = d.N * d.C * d.S;
    if (total > 0)
      bn_apply<S><<<grid_for(total, 256), 256, 0, stream>>>(d, static_cast<const S*>(x), coef,
                                                           static_cast<S*>(y));
    return last_error();
  });
}

int batch_norm_backward(const BNDesc& d, DType dt, DType pdt, DType mdt, const void* gy,
                        const void* x, const void* weight, const void* mean,
                        const void* invstd, bool training, void* gx, void* gw, void* gb,
                        void* workspace, cudaStream_t stream) {
  if (d.C <= 0) return 0;
  if (d.C > 2147483647LL) return int(cudaErrorInvalidConfiguration);
  return dispatch_dtype(dt, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using Acc = typename Num<S>::Acc;
    const int64_t splits = bn_splits(d), chunk = ceil_div(d.N * d.S, splits);
    Acc* part = static_cast<Acc*>(workspace);
    Acc* coef = part + d.C * splits * 3;
    const bool need_sums = gw != nullptr || gb != nullptr || (gx != nullptr && training);
    int err = 0;
    if (need_sums) {
      bn_bwd_partial<S><<<dim3(unsigned(d.C), unsigned(splits)), kBNThreads, 0, stream>>>(
          d, mdt, static_cast<const S*>(gy), static_cast<const S*>(x), mean, chunk, part);
      if ((err = last_error())) return err;
    }
    bn_bwd_finalize<Acc><<<grid_for(d.C, 128), 128, 0, stream>>>(
        d, pdt, mdt, part, splits, weight, mean, invstd, training, need_sums, gw, gb, coef);
    if ((err = last_error())) return err;
    const int64_t total = d.N * d.C * d.S;
    if (gx != nullptr && total > 0)
      bn_bwd_apply<S><<<grid_for(total, 256), 256, 0, stream>>>(
          d, static_cast<const S*>(gy), static_cast<const S*>(x), coef, static_cast<S*>(gx));
    return last_error();
  });
}

}  // namespace fastlayers::cuda
