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
// Channels-last data (< 2^31 elements) take the NHWC row kernels instead
// (bn_stats_partial_nhwc, bn_bwd_partial_nhwc, bn_apply_nhwc, bn_bwd_apply_nhwc:
// threads along the contiguous channels, see "Channels-last" below) with
// warp-per-channel finalizes.
// fp16/bf16 data use fp32 statistics; float64 data use float64. No atomics:
// results are bitwise reproducible.
// sm_90 training fast path (bn_train_fwd_cluster / bn_train_bwd_cluster): one
// thread-block cluster per channel at a time, reduce + apply in one kernel with
// the re-read served from L2; used for dense NC* data when enough channels fit in
// L2 at once (bn_cluster_grid), else the kernels above. FASTLAYERS_BN_NO_CLUSTER=1
// turns it off (A/B checks).
#include <cooperative_groups.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "common.cuh"

namespace fastlayers::cuda {
namespace {

constexpr int kBNThreads = 256;

int64_t bn_splits(const BNDesc& d) {
  // ~16 blocks per SM on a 132-SM part, each with at least 4096 items.
  int64_t sp = ceil_div(2112, d.C > 0 ? d.C : 1);
  const int64_t by_size = ceil_div(d.N * d.S, 4096);
  if (sp > by_size) sp = by_size;
  if (sp < 1) sp = 1;
  return sp;
}


// Merges (nb, mb, m2b) into (na, ma, m2a).
template <typename Acc>
FL_HD __forceinline__ void welford_merge(Acc& na, Acc& ma, Acc& m2a, Acc nb, Acc mb, Acc m2b) {
  const Acc n = na + nb;
  if (nb == Acc(0)) return;
  if (na == Acc(0)) { na = nb; ma = mb; m2a = m2b; return; }
  const Acc delta = mb - ma, fb = nb / n;
  ma = ma + delta * fb;
  m2a = m2a + m2b + delta * delta * na * fb;
  na = n;
}



// ---- Vectorised fast paths: 16-byte loads of VEC = 16 / sizeof(S) elements. ----
template <typename S> struct alignas(16) BNVec { S v[16 / sizeof(S)]; };
template <typename S> FL_HD constexpr int bn_vec() { return int(16 / sizeof(S)); }

// Reductions over one channel of a dense NC* tensor (plane of S contiguous
// elements per n) in units of vectors: vector v of channel c covers elements
// n*sN + c*sC + s*VEC .. +VEC-1 with n = v / SV, s = v % SV (SV = S / VEC).
struct BNPlanes {
  int64_t sN, sC;
  uint32_t SV;
  FastDiv dSV;
};
template <typename S>
FL_HD __forceinline__ int64_t bn_plane_vec_offset(const BNPlanes& pl, int64_t c, uint32_t v) {
  const uint32_t n = pl.dSV.div(v), s = v - n * pl.SV;
  return int64_t(n) * pl.sN + c * pl.sC + int64_t(s) * bn_vec<S>();
}

// One thread's Welford state over its vectors v = v0, v0 + step, ... < v1, in
// rounds of up to 4 vectors (all 4 loads issued first): the round's (count,
// mean, M2) by two passes over the registers, merged in once.
template <typename S>
FL_HD __forceinline__ void bn_stats_thread(const BNPlanes& pl, const S* __restrict__ x,
                                           int64_t c, uint32_t v0, uint32_t v1, uint32_t step,
                                           typename Num<S>::Acc& n, typename Num<S>::Acc& mean,
                                           typename Num<S>::Acc& m2) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>(), U = 4;
  for (uint32_t v = v0; v < v1; v += U * step) {
    BNVec<S> pk[U];
    int nb = 0;
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (v + u * step < v1) {
        pk[u] = *reinterpret_cast<const BNVec<S>*>(x + bn_plane_vec_offset<S>(pl, c, v + u * step));
        nb = u + 1;
      }
    Acc sum = Acc(0);
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (u < nb)
FL_UNROLL
        for (int i = 0; i < V; ++i) sum += Num<S>::to_acc(pk[u].v[i]);
    const Acc cnt = Acc(nb * V), mb = sum / cnt;
    Acc m2b = Acc(0);
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (u < nb)
FL_UNROLL
        for (int i = 0; i < V; ++i) {
          const Acc e = Num<S>::to_acc(pk[u].v[i]) - mb;
          m2b += e * e;
        }
    welford_merge(n, mean, m2, cnt, mb, m2b);
  }
}

// Sums of dy and dy * (x - mu) over the same vectors, two vectors of each tensor
// per round (four loads in flight).
template <typename S>
FL_HD __forceinline__ void bn_bwd_sums_thread(const BNPlanes& pl, const S* __restrict__ gy,
                                              const S* __restrict__ x, int64_t c,
                                              typename Num<S>::Acc mu, uint32_t v0, uint32_t v1,
                                              uint32_t step, typename Num<S>::Acc& sdy,
                                              typename Num<S>::Acc& sdyx) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>(), U = 2;
  for (uint32_t v = v0; v < v1; v += U * step) {
    BNVec<S> g[U], xv[U];
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (v + u * step < v1) {
        const int64_t o = bn_plane_vec_offset<S>(pl, c, v + u * step);
        g[u] = *reinterpret_cast<const BNVec<S>*>(gy + o);
        xv[u] = *reinterpret_cast<const BNVec<S>*>(x + o);
      }
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (v + u * step < v1)
FL_UNROLL
        for (int i = 0; i < V; ++i) {
          const Acc gi = Num<S>::to_acc(g[u].v[i]);
          sdy += gi;
          sdyx += gi * (Num<S>::to_acc(xv[u].v[i]) - mu);
        }
  }
}

// Channel of the first element of vector v (memory order) of a dense tensor,
// and whether the VEC elements share it (NC*) or run over c0 .. c0+VEC-1 (NHWC).
struct BNElems {
  bool channels_last;
  uint32_t C;
  FastDiv dSV, dC, dCV;  // S / VEC, C, C / VEC
};
template <typename S>
FL_HD __forceinline__ uint32_t bn_vec_channel(const BNElems& e, uint32_t v) {
  if (e.channels_last) {
    const uint32_t cv = v - e.dCV.div(v) * e.dCV.d;
    return cv * uint32_t(bn_vec<S>());
  }
  const uint32_t u = e.dSV.div(v);
  return u - e.dC.div(u) * e.C;
}

// Block-wide Welford merge in a fixed order (shuffles inside the warp, then warp 0
// over the warps); thread 0 writes (n, mean, M2) to out[0..2].
template <typename Acc>
__device__ __forceinline__ void welford_block_store(Acc n, Acc mean, Acc m2, Acc* out) {
  __shared__ Acc sh[3][32];
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
    if (lane == 0) { out[0] = n; out[1] = mean; out[2] = m2; }
  }
}

// Vectorised stats partials: block (c, split) takes vectors [split*chunk, +chunk).
template <typename S>
__global__ void bn_stats_partial_vec(BNPlanes pl, const S* __restrict__ x, uint32_t vecs,
                                     uint32_t chunk, typename Num<S>::Acc* __restrict__ part) {
  using Acc = typename Num<S>::Acc;
  const int64_t c = blockIdx.x, sp = blockIdx.y;
  const uint32_t v0 = min(uint32_t(sp) * chunk, vecs), v1 = min(v0 + chunk, vecs);
  Acc n = 0, mean = 0, m2 = 0;
  bn_stats_thread<S>(pl, x, c, v0 + threadIdx.x, v1, blockDim.x, n, mean, m2);
  welford_block_store(n, mean, m2, part + (c * gridDim.y + sp) * 3);
}

template <typename S>
__global__ void bn_stats_partial(BNDesc d, const S* __restrict__ x, int64_t chunk,
                                 typename Num<S>::Acc* __restrict__ part) {
  using Acc = typename Num<S>::Acc;
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
  welford_block_store(n, mean, m2, part + (c * gridDim.y + sp) * 3);
}

// Per-channel tail of the statistics: saved/running statistics and
// coef layout: [3][C] Acc: mean, scale = w * invstd, beta = b.
template <typename Acc>
__device__ __forceinline__ void bn_stats_epilogue(const BNDesc& d, DType pdt, int64_t c, double n,
                                                  double mean, double m2, const void* weight,
                                                  const void* bias, void* running_mean,
                                                  void* running_var, double momentum, double eps,
                                                  Acc* save_mean, Acc* save_invstd, Acc* coef) {
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
    bn_stats_epilogue<Acc>(d, pdt, c, n, mean, m2, weight, bias, running_mean, running_var,
                           momentum, eps, save_mean, save_invstd, coef);
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

template <typename S>
__global__ void bn_bwd_partial_vec(BNPlanes pl, DType mdt, const S* __restrict__ gy,
                                   const S* __restrict__ x, const void* mean, uint32_t vecs,
                                   uint32_t chunk, typename Num<S>::Acc* __restrict__ part) {
  using Acc = typename Num<S>::Acc;
  __shared__ Acc sh[32];
  const int64_t c = blockIdx.x, sp = blockIdx.y;
  const uint32_t v0 = min(uint32_t(sp) * chunk, vecs), v1 = min(v0 + chunk, vecs);
  const Acc mu = load_any<Acc>(mean, mdt, c);
  Acc sdy = 0, sdyx = 0;
  bn_bwd_sums_thread<S>(pl, gy, x, c, mu, v0 + threadIdx.x, v1, blockDim.x, sdy, sdyx);
  sdy = block_sum(sdy, sh);
  sdyx = block_sum(sdyx, sh);
  if (threadIdx.x == 0) {
    Acc* o = part + (c * gridDim.y + sp) * 2;
    o[0] = sdy; o[1] = sdyx;
  }
}

// Per-channel tail of the backward reductions: grad_weight/bias and
// coef layout: [4][C] Acc: mean, a = w * invstd, k1, k2 (dx = a*(dy - k1 - (x-mean)*k2)).
template <typename Acc>
__device__ __forceinline__ void bn_bwd_epilogue(const BNDesc& d, DType pdt, DType mdt, int64_t c,
                                                double sdy, double sdyx, const void* weight,
                                                const void* mean, const void* invstd,
                                                bool training, void* gw, void* gb, Acc* coef) {
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
    bn_bwd_epilogue<Acc>(d, pdt, mdt, c, sdy, sdyx, weight, mean, invstd, training, gw, gb, coef);
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

// Elementwise kernels over vectors of a dense tensor (total / VEC vectors).
template <typename S>
__global__ void bn_apply_vec(BNElems e, uint32_t vecs, const S* __restrict__ x,
                             const typename Num<S>::Acc* coef, S* __restrict__ y) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>();
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < vecs;
       t += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t v = uint32_t(t), c0 = bn_vec_channel<S>(e, v), ci = e.channels_last ? 1 : 0;
    const BNVec<S> in = reinterpret_cast<const BNVec<S>*>(x)[v];
    BNVec<S> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const uint32_t c = c0 + ci * i;
      out.v[i] = Num<S>::from_acc((Num<S>::to_acc(in.v[i]) - coef[c]) * coef[e.C + c] +
                                  coef[2 * e.C + c]);
    }
    reinterpret_cast<BNVec<S>*>(y)[v] = out;
  }
}

template <typename S>
__global__ void bn_bwd_apply_vec(BNElems e, uint32_t vecs, const S* __restrict__ gy,
                                 const S* __restrict__ x, const typename Num<S>::Acc* coef,
                                 S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>();
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < vecs;
       t += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t v = uint32_t(t), c0 = bn_vec_channel<S>(e, v), ci = e.channels_last ? 1 : 0;
    const BNVec<S> g = reinterpret_cast<const BNVec<S>*>(gy)[v];
    const BNVec<S> xv = reinterpret_cast<const BNVec<S>*>(x)[v];
    BNVec<S> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const uint32_t c = c0 + ci * i;
      const Acc xm = Num<S>::to_acc(xv.v[i]) - coef[c];
      out.v[i] = Num<S>::from_acc(coef[e.C + c] * (Num<S>::to_acc(g.v[i]) - coef[2 * e.C + c] -
                                                   xm * coef[3 * e.C + c]));
    }
    reinterpret_cast<BNVec<S>*>(gx)[v] = out;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- Channels-last (NHWC) kernels ------------------------------------------------
// Element (n, c, s) at (n*S + s)*C + c: R = N*S rows of C contiguous channels. A
// row is cut into units of L channels (L = 16 / sizeof(S) when C % L == 0 and the
// data are 16-byte aligned: one 16-byte load; else L = 1). Block (split, chunk):
// `cols` threads per row take consecutive units of the chunk (chunk = up to 256
// units), `rpi` rows side by side (cols * rpi <= 256), so a block reads one
// contiguous range per iteration. Thread (tx, ty) walks rows r0 + ty, + rpi, ...
// of its split's fixed row range [r0, r1) with U = 4 loads in flight, keeping per
// channel lane a Welford state (statistics; of x minus a per-channel pivot, see
// bn_nhwc_pivot) or sums (backward) in registers; the
// block merges rows ty = 0, 1, ... in that order (shared memory) and writes one
// partial per channel: part[(c * splits + split) * K]. A warp per channel merges
// the splits (lane k takes splits k, k + 32, ...; then a shuffle tree): fixed
// order, deterministic. The elementwise passes use the same walk, with the
// per-channel coefficients held in registers.
struct BNRows {
  uint32_t R, CU;                   // rows, units per row
  uint32_t cols, rpi, chunks;       // threads per row, rows per iteration, unit chunks
  uint32_t splits, rows_per_split;  // row ranges (grid.x)
};
template <typename S, int L> struct alignas(L * sizeof(S)) BNUnit { S v[L]; };
constexpr int kBNRowsU = 4;

// Split count: about 1024 blocks, each thread at least 4 rows, at most 2^19
// partials (workspace); L: channels per unit.
inline BNRows bn_rows(const BNDesc& d, int L) {
  BNRows g;
  g.R = uint32_t(d.N * d.S);
  g.CU = uint32_t(d.C / L);
  g.cols = g.CU < uint32_t(kBNThreads) ? g.CU : uint32_t(kBNThreads);
  g.rpi = uint32_t(kBNThreads) / g.cols;
  g.chunks = uint32_t(ceil_div(g.CU, g.cols));
  int64_t sp = ceil_div(1024, g.chunks);
  const int64_t by_rows = ceil_div(g.R, int64_t(kBNRowsU) * g.rpi);
  const int64_t by_ws = (int64_t(1) << 19) / d.C;
  if (sp > by_rows) sp = by_rows;
  if (sp > by_ws) sp = by_ws;
  if (sp < 1) sp = 1;
  g.rows_per_split = uint32_t(ceil_div(g.R, sp));
  g.splits = uint32_t(ceil_div(g.R, g.rows_per_split));
  return g;
}
// Dense channels-last, fewer than 2^31 elements, chunk count within grid.y.
// Off with FASTLAYERS_CUDA_NEW=0 (common.cuh).
inline bool bn_nhwc_ok(const BNDesc& d) {
  return new_paths_enabled() && d.channels_last && d.N > 0 && d.S > 0 && d.C > 0 &&
         d.N * d.C * d.S < (int64_t(1) << 31) && ceil_div(d.C, kBNThreads) <= 65535;
}

// The statistics kernel accumulates x - pivot, the finalize adds the pivot back
// in double: the channel's value in row 0 (element c of the NHWC data), or 0 when
// that is not finite (inf - inf would make every shifted value NaN). With a mean
// far from 0 (1000 +- 0.5 in the tests) the float32 Welford merges otherwise round
// at the mean's magnitude: grad_weight came out 1.2e-2 off on the H200.
template <typename S>
FL_HD __forceinline__ typename Num<S>::Acc bn_nhwc_pivot(const S* x, int64_t c) {
  using Acc = typename Num<S>::Acc;
  const Acc v = Num<S>::to_acc(x[c]);
  return v - v == Acc(0) ? v : Acc(0);   // false for inf and NaN
}

// Thread (tx, ty) of block (sp, ch): its unit cu, its rows [r0 + ty, r1) step rpi;
// false when the thread has no unit.
FL_HD __forceinline__ bool bn_rows_thread(const BNRows& g, uint32_t sp, uint32_t ch, uint32_t tid,
                                          uint32_t& cu, uint32_t& r, uint32_t& r1) {
  const uint32_t tx = tid % g.cols, ty = tid / g.cols;
  cu = ch * g.cols + tx;
  const uint32_t r0 = sp * g.rows_per_split;
  r = r0 + ty;
  r1 = r0 + g.rows_per_split < g.R ? r0 + g.rows_per_split : g.R;
  return ty < g.rpi && cu < g.CU;
}

template <typename S, int L>
FL_HD __forceinline__ void bn_nhwc_stats_thread(const BNRows& g, const S* __restrict__ x,
                                                uint32_t cu, uint32_t r, uint32_t r1,
                                                const typename Num<S>::Acc (&piv)[L],
                                                typename Num<S>::Acc (&n)[L],
                                                typename Num<S>::Acc (&mean)[L],
                                                typename Num<S>::Acc (&m2)[L]) {
  using Acc = typename Num<S>::Acc;
  constexpr int U = kBNRowsU;
  const BNUnit<S, L>* xu = reinterpret_cast<const BNUnit<S, L>*>(x);
  for (; r < r1; r += U * g.rpi) {
    BNUnit<S, L> pk[U];
    int nb = 0;
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (r + u * g.rpi < r1) { pk[u] = xu[(r + u * g.rpi) * g.CU + cu]; nb = u + 1; }
FL_UNROLL
    for (int l = 0; l < L; ++l) {
      Acc sum = Acc(0);
FL_UNROLL
      for (int u = 0; u < U; ++u)
        if (u < nb) sum += Num<S>::to_acc(pk[u].v[l]) - piv[l];
      const Acc cnt = Acc(nb), mb = sum / cnt;
      Acc m2b = Acc(0);
FL_UNROLL
      for (int u = 0; u < U; ++u)
        if (u < nb) {
          const Acc e = (Num<S>::to_acc(pk[u].v[l]) - piv[l]) - mb;
          m2b += e * e;
        }
      welford_merge(n[l], mean[l], m2[l], cnt, mb, m2b);
    }
  }
}

template <typename S, int L>
FL_HD __forceinline__ void bn_nhwc_sums_thread(const BNRows& g, const S* __restrict__ gy,
                                               const S* __restrict__ x, uint32_t cu, uint32_t r,
                                               uint32_t r1, const typename Num<S>::Acc (&mu)[L],
                                               typename Num<S>::Acc (&sdy)[L],
                                               typename Num<S>::Acc (&sdyx)[L]) {
  using Acc = typename Num<S>::Acc;
  constexpr int U = kBNRowsU / 2;  // two units of each tensor per round
  const BNUnit<S, L>* gu = reinterpret_cast<const BNUnit<S, L>*>(gy);
  const BNUnit<S, L>* xu = reinterpret_cast<const BNUnit<S, L>*>(x);
  for (; r < r1; r += U * g.rpi) {
    BNUnit<S, L> gv[U], xv[U];
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (r + u * g.rpi < r1) {
        const uint32_t o = (r + u * g.rpi) * g.CU + cu;
        gv[u] = gu[o];
        xv[u] = xu[o];
      }
FL_UNROLL
    for (int u = 0; u < U; ++u)
      if (r + u * g.rpi < r1)
FL_UNROLL
        for (int l = 0; l < L; ++l) {
          const Acc gi = Num<S>::to_acc(gv[u].v[l]);
          sdy[l] += gi;
          sdyx[l] += gi * (Num<S>::to_acc(xv[u].v[l]) - mu[l]);
        }
  }
}

template <typename S, int L>
__global__ void __launch_bounds__(kBNThreads)
    bn_stats_partial_nhwc(BNRows g, const S* __restrict__ x, typename Num<S>::Acc* __restrict__ part) {
  using Acc = typename Num<S>::Acc;
  __shared__ Acc sh[3][kBNThreads * L];
  uint32_t cu, r, r1;
  const uint32_t tid = threadIdx.x;
  const bool active = bn_rows_thread(g, blockIdx.x, blockIdx.y, tid, cu, r, r1);
  Acc n[L], mean[L], m2[L], piv[L];
#pragma unroll
  for (int l = 0; l < L; ++l) {
    n[l] = mean[l] = m2[l] = Acc(0);
    piv[l] = active ? bn_nhwc_pivot(x, int64_t(cu) * L + l) : Acc(0);
  }
  if (active) bn_nhwc_stats_thread<S, L>(g, x, cu, r, r1, piv, n, mean, m2);
  if (active && tid >= g.cols)
#pragma unroll
    for (int l = 0; l < L; ++l) {
      sh[0][tid * L + l] = n[l]; sh[1][tid * L + l] = mean[l]; sh[2][tid * L + l] = m2[l];
    }
  __syncthreads();
  if (!active || tid >= g.cols) return;
  for (uint32_t k = 1; k < g.rpi; ++k) {
    const uint32_t j = (k * g.cols + tid) * L;
#pragma unroll
    for (int l = 0; l < L; ++l)
      welford_merge(n[l], mean[l], m2[l], sh[0][j + l], sh[1][j + l], sh[2][j + l]);
  }
#pragma unroll
  for (int l = 0; l < L; ++l) {
    Acc* o = part + (int64_t(cu * L + l) * g.splits + blockIdx.x) * 3;
    o[0] = n[l]; o[1] = mean[l]; o[2] = m2[l];
  }
}

template <typename S, int L>
__global__ void __launch_bounds__(kBNThreads)
    bn_bwd_partial_nhwc(BNRows g, DType mdt, const S* __restrict__ gy, const S* __restrict__ x,
                        const void* mean, typename Num<S>::Acc* __restrict__ part) {
  using Acc = typename Num<S>::Acc;
  __shared__ Acc sh[2][kBNThreads * L];
  uint32_t cu, r, r1;
  const uint32_t tid = threadIdx.x;
  const bool active = bn_rows_thread(g, blockIdx.x, blockIdx.y, tid, cu, r, r1);
  Acc mu[L], sdy[L], sdyx[L];
#pragma unroll
  for (int l = 0; l < L; ++l) {
    mu[l] = active ? load_any<Acc>(mean, mdt, int64_t(cu) * L + l) : Acc(0);
    sdy[l] = sdyx[l] = Acc(0);
  }
  if (active) bn_nhwc_sums_thread<S, L>(g, gy, x, cu, r, r1, mu, sdy, sdyx);
  if (active && tid >= g.cols)
#pragma unroll
    for (int l = 0; l < L; ++l) { sh[0][tid * L + l] = sdy[l]; sh[1][tid * L + l] = sdyx[l]; }
  __syncthreads();
  if (!active || tid >= g.cols) return;
  for (uint32_t k = 1; k < g.rpi; ++k) {
    const uint32_t j = (k * g.cols + tid) * L;
#pragma unroll
    for (int l = 0; l < L; ++l) { sdy[l] += sh[0][j + l]; sdyx[l] += sh[1][j + l]; }
  }
#pragma unroll
  for (int l = 0; l < L; ++l) {
    Acc* o = part + (int64_t(cu * L + l) * g.splits + blockIdx.x) * 2;
    o[0] = sdy[l]; o[1] = sdyx[l];
  }
}

// y = (x - mean) * scale + b; coef [3][C].
template <typename S, int L>
__global__ void __launch_bounds__(kBNThreads)
    bn_apply_nhwc(BNRows g, const S* __restrict__ x, const typename Num<S>::Acc* __restrict__ coef,
                  S* __restrict__ y) {
  using Acc = typename Num<S>::Acc;
  constexpr int U = kBNRowsU;
  uint32_t cu, r, r1;
  if (!bn_rows_thread(g, blockIdx.x, blockIdx.y, threadIdx.x, cu, r, r1)) return;
  const uint32_t C = g.CU * L;
  Acc mu[L], sc[L], be[L];
#pragma unroll
  for (int l = 0; l < L; ++l) {
    const uint32_t c = cu * L + l;
    mu[l] = coef[c]; sc[l] = coef[C + c]; be[l] = coef[2 * C + c];
  }
  const BNUnit<S, L>* xu = reinterpret_cast<const BNUnit<S, L>*>(x);
  BNUnit<S, L>* yu = reinterpret_cast<BNUnit<S, L>*>(y);
  for (; r < r1; r += U * g.rpi) {
    BNUnit<S, L> pk[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (r + u * g.rpi < r1) pk[u] = xu[(r + u * g.rpi) * g.CU + cu];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (r + u * g.rpi < r1) {
        BNUnit<S, L> out;
#pragma unroll
        for (int l = 0; l < L; ++l)
          out.v[l] = Num<S>::from_acc((Num<S>::to_acc(pk[u].v[l]) - mu[l]) * sc[l] + be[l]);
        yu[(r + u * g.rpi) * g.CU + cu] = out;
      }
  }
}

// dx = a * (dy - k1 - (x - mean) * k2); coef [4][C].
template <typename S, int L>
__global__ void __launch_bounds__(kBNThreads)
    bn_bwd_apply_nhwc(BNRows g, const S* __restrict__ gy, const S* __restrict__ x,
                      const typename Num<S>::Acc* __restrict__ coef, S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  constexpr int U = kBNRowsU / 2;
  uint32_t cu, r, r1;
  if (!bn_rows_thread(g, blockIdx.x, blockIdx.y, threadIdx.x, cu, r, r1)) return;
  const uint32_t C = g.CU * L;
  Acc mu[L], a[L], k1[L], k2[L];
#pragma unroll
  for (int l = 0; l < L; ++l) {
    const uint32_t c = cu * L + l;
    mu[l] = coef[c]; a[l] = coef[C + c]; k1[l] = coef[2 * C + c]; k2[l] = coef[3 * C + c];
  }
  const BNUnit<S, L>* gu = reinterpret_cast<const BNUnit<S, L>*>(gy);
  const BNUnit<S, L>* xu = reinterpret_cast<const BNUnit<S, L>*>(x);
  BNUnit<S, L>* ou = reinterpret_cast<BNUnit<S, L>*>(gx);
  for (; r < r1; r += U * g.rpi) {
    BNUnit<S, L> gv[U], xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (r + u * g.rpi < r1) {
        const uint32_t o = (r + u * g.rpi) * g.CU + cu;
        gv[u] = gu[o];
        xv[u] = xu[o];
      }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (r + u * g.rpi < r1) {
        BNUnit<S, L> out;
#pragma unroll
        for (int l = 0; l < L; ++l) {
          const Acc xm = Num<S>::to_acc(xv[u].v[l]) - mu[l];
          out.v[l] = Num<S>::from_acc(a[l] * (Num<S>::to_acc(gv[u].v[l]) - k1[l] - xm * k2[l]));
        }
        ou[(r + u * g.rpi) * g.CU + cu] = out;
      }
  }
}

// Warp-per-channel finalizes of the [C][splits] partials (blockDim.x a multiple of 32);
// the statistics one adds back the pivot of x (NHWC data).
template <typename S, typename Acc = typename Num<S>::Acc>
__global__ void bn_stats_finalize_warp(BNDesc d, DType pdt, const Acc* __restrict__ part,
                                       int64_t splits, const S* x,
                                       const void* weight, const void* bias,
                                       void* running_mean, void* running_var, double momentum,
                                       double eps, Acc* save_mean, Acc* save_invstd, Acc* coef) {
  const int64_t nw = int64_t(gridDim.x) * blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; c < d.C; c += nw) {
    double n = 0, mean = 0, m2 = 0;
    for (int64_t k = lane; k < splits; k += 32) {
      const Acc* p = part + (c * splits + k) * 3;
      welford_merge<double>(n, mean, m2, double(p[0]), double(p[1]), double(p[2]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const double nb = __shfl_down_sync(0xffffffffu, n, o);
      const double mb = __shfl_down_sync(0xffffffffu, mean, o);
      const double m2b = __shfl_down_sync(0xffffffffu, m2, o);
      welford_merge<double>(n, mean, m2, nb, mb, m2b);
    }
    if (lane == 0)
      bn_stats_epilogue<Acc>(d, pdt, c, n, mean + double(bn_nhwc_pivot(x, c)), m2, weight,
                             bias, running_mean, running_var, momentum, eps, save_mean,
                             save_invstd, coef);
  }
}

template <typename Acc>
__global__ void bn_bwd_finalize_warp(BNDesc d, DType pdt, DType mdt, const Acc* __restrict__ part,
                                     int64_t splits, const void* weight, const void* mean,
                                     const void* invstd, bool training, bool have_sums, void* gw,
                                     void* gb, Acc* coef) {
  const int64_t nw = int64_t(gridDim.x) * blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; c < d.C; c += nw) {
    double sdy = 0, sdyx = 0;
    if (have_sums)
      for (int64_t k = lane; k < splits; k += 32) {
        sdy += double(part[(c * splits + k) * 2]);
        sdyx += double(part[(c * splits + k) * 2 + 1]);
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      sdy += __shfl_down_sync(0xffffffffu, sdy, o);
      sdyx += __shfl_down_sync(0xffffffffu, sdyx, o);
    }
    if (lane == 0)
      bn_bwd_epilogue<Acc>(d, pdt, mdt, c, sdy, sdyx, weight, mean, invstd, training, gw, gb, coef);
  }
}

// ---- Cluster-fused training paths (sm_90; dense NC*, see bn_cluster_grid) --------
// One thread-block cluster of kCl blocks owns one channel at a time (channels
// c = cluster, cluster + G, ...): each block reduces its 1/kCl share of the
// channel (16-byte loads, 4 in flight per thread), the kCl block partials are
// merged in rank order through distributed shared memory (every block merges the
// same values in the same order: identical, deterministic coefficients), then
// each block re-reads ITS share -- read moments ago, so served from L2 because
// G is chosen so that G channels fit in half of L2 -- and writes the output.
// DRAM traffic: forward x + y (2 passes instead of 3), backward x + gy + gx
// (3 instead of 5). Shared partials are double-buffered by channel parity, so
// one cluster barrier per channel suffices.
constexpr int kCl = 8, kClThreads = 1024;
// forward: vectors per thread per round (4 for 4-byte types; 2 keeps 2/8-byte ones
// within the 64 registers of a 1024-thread block)
template <typename S> __host__ __device__ constexpr int kFU() { return sizeof(S) == 4 ? 4 : 2; }
// backward: vectors per tensor per round (x and gy: 4 loads in flight; bf16: 2, its
// float -> bf16 rounding code otherwise spills)
template <typename S> __host__ __device__ constexpr int kBUof() { return std::is_same<S, __nv_bfloat16>::value ? 1 : 2;
}

template <typename S>
__device__ __forceinline__ BNVec<S> bn_ldv(const S* p, uint32_t o) {
  return *reinterpret_cast<const BNVec<S>*>(p + o);
}
// Element offset of vector v of channel c (the whole tensor has < 2^31 elements).
template <typename S>
__device__ __forceinline__ uint32_t bn_cl_off(const BNPlanes& pl, uint32_t c, uint32_t v) {
  const uint32_t n = pl.dSV.div(v), s = v - n * pl.SV;
  return n * uint32_t(pl.sN) + c * uint32_t(pl.sC) + s * uint32_t(bn_vec<S>());
}

// Thread 0 of each block after the cluster barrier: merges the kCl partials in
// rank order (double), rank 0 stores the saved/running statistics; writes
// coef = (mean, w * invstd, b). Out of line: keeps the streaming loops' registers.
template <typename Acc>
__device__ __noinline__ void bn_cl_fwd_finalize(const Acc* const* parts, bool store, int64_t c,
                                                DType pdt, const void* weight, const void* bias,
                                                void* running_mean, void* running_var,
                                                double momentum, double eps, Acc* save_mean,
                                                Acc* save_invstd, Acc* coef) {
  double cn = 0, cm = 0, cm2 = 0;
  for (int r = 0; r < kCl; ++r)
    welford_merge<double>(cn, cm, cm2, double(parts[r][0]), double(parts[r][1]),
                          double(parts[r][2]));
  const double var = cn > 0 ? cm2 / cn : NAN;
  const double invstd = 1.0 / sqrt(var + eps);
  if (store) {
    save_mean[c] = Acc(cm);
    save_invstd[c] = Acc(invstd);
    if (running_mean) {
      const double rm = load_any<double>(running_mean, pdt, c);
      store_any<double>(running_mean, pdt, c, (1.0 - momentum) * rm + momentum * cm);
    }
    if (running_var) {
      const double rv = load_any<double>(running_var, pdt, c);
      store_any<double>(running_var, pdt, c, (1.0 - momentum) * rv + momentum * (cm2 / (cn - 1.0)));
    }
  }
  coef[0] = Acc(cm);
  coef[1] = (weight ? load_any<Acc>(weight, pdt, c) : Acc(1)) * Acc(invstd);
  coef[2] = bias ? load_any<Acc>(bias, pdt, c) : Acc(0);
}

// Backward counterpart: sums in rank order; coef = (mean, w * invstd, k1, k2).
template <typename Acc>
__device__ __noinline__ void bn_cl_bwd_finalize(const Acc* const* parts, bool store, int64_t c,
                                                DType pdt, DType mdt, const void* weight,
                                                const void* mean, const void* invstd, double M,
                                                void* gw, void* gb, Acc* coef) {
  double s1 = 0, s2 = 0;
  for (int r = 0; r < kCl; ++r) { s1 += double(parts[r][0]); s2 += double(parts[r][1]); }
  const double is = load_any<double>(invstd, mdt, c);
  if (store) {
    if (gw) store_any<double>(gw, pdt, c, s2 * is);
    if (gb) store_any<double>(gb, pdt, c, s1);
  }
  const double w = weight ? load_any<double>(weight, pdt, c) : 1.0;
  coef[0] = load_any<Acc>(mean, mdt, c);
  coef[1] = Acc(w * is);
  coef[2] = Acc(s1 / M);
  coef[3] = Acc(is * is * s2 / M);
}

// Welford state over this thread's vectors of channel c in [v0, v1) (stride
// blockDim.x), four vectors per round: their (count, mean, M2) by two passes
// over the registers, merged once.
template <typename S>
__device__ __forceinline__ void bn_cl_stats(const BNPlanes& pl, const S* __restrict__ x,
                                            int64_t c, uint32_t v0, uint32_t v1,
                                            typename Num<S>::Acc& n, typename Num<S>::Acc& mean,
                                            typename Num<S>::Acc& m2) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>(), U = kFU<S>();
  const uint32_t T = blockDim.x;
  for (uint32_t v = v0 + threadIdx.x; v < v1; v += U * T) {
    BNVec<S> pk[U];
    int nb = 0;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (v + u * T < v1) { pk[u] = bn_ldv(x, bn_cl_off<S>(pl, uint32_t(c), v + u * T)); nb = u + 1; }
    Acc sum = Acc(0);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < nb)
#pragma unroll
        for (int i = 0; i < V; ++i) sum += Num<S>::to_acc(pk[u].v[i]);
    const Acc cnt = Acc(nb * V), mb = sum / cnt;
    Acc m2b = Acc(0);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < nb)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const Acc e = Num<S>::to_acc(pk[u].v[i]) - mb;
          m2b += e * e;
        }
    welford_merge(n, mean, m2, cnt, mb, m2b);
  }
}

template <typename S>
__global__ void __launch_bounds__(kClThreads, 1)
    bn_train_fwd_cluster(BNPlanes pl, int64_t C, uint32_t vecs, DType pdt,
                         const S* __restrict__ x, const void* weight, const void* bias,
                         void* running_mean, void* running_var, double momentum, double eps,
                         typename Num<S>::Acc* save_mean, typename Num<S>::Acc* save_invstd,
                         S* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>(), U = kFU<S>();
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ Acc part[2][3];  // this block's (n, mean, M2), by channel parity
  __shared__ Acc coef[3];     // mean, w * invstd, b
  const uint32_t rank = cluster.block_rank();
  const int64_t G = gridDim.x / kCl, cid = blockIdx.x / kCl;
  const uint32_t chunk = (vecs + kCl - 1) / kCl;
  const uint32_t v0 = min(rank * chunk, vecs), v1 = min(v0 + chunk, vecs);
  int it = 0;
  for (int64_t c = cid; c < C; c += G, it ^= 1) {
    Acc n = 0, mean = 0, m2 = 0;
    bn_cl_stats<S>(pl, x, c, v0, v1, n, mean, m2);
    welford_block_store(n, mean, m2, part[it]);
    cluster.sync();
    if (threadIdx.x == 0) {
      const Acc* parts[kCl];
      for (int r = 0; r < kCl; ++r) parts[r] = cluster.map_shared_rank(part[it], r);
      bn_cl_fwd_finalize<Acc>(parts, rank == 0, c, pdt, weight, bias, running_mean, running_var,
                              momentum, eps, save_mean, save_invstd, coef);
    }
    __syncthreads();
    const Acc mu = coef[0], sc = coef[1], be = coef[2];
    const uint32_t T = blockDim.x;
    for (uint32_t v = v0 + threadIdx.x; v < v1; v += U * T) {
      BNVec<S> pk[U];
      uint32_t o[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (v + u * T < v1) { o[u] = bn_cl_off<S>(pl, uint32_t(c), v + u * T); pk[u] = bn_ldv(x, o[u]); }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (v + u * T < v1) {
          BNVec<S> out;
#pragma unroll
          for (int i = 0; i < V; ++i)
            out.v[i] = Num<S>::from_acc((Num<S>::to_acc(pk[u].v[i]) - mu) * sc + be);
          *reinterpret_cast<BNVec<S>*>(y + o[u]) = out;
        }
    }
    // coef / part[it] are rewritten only after the next cluster.sync(), which every
    // thread of the cluster reaches after its reads of them.
  }
  cluster.sync();  // no block may exit while another can still read its shared memory
#endif
}

template <typename S>
__global__ void __launch_bounds__(kClThreads, 1)
    bn_train_bwd_cluster(BNPlanes pl, int64_t C, uint32_t vecs, DType pdt, DType mdt,
                         const S* __restrict__ gy, const S* __restrict__ x, const void* weight,
                         const void* mean, const void* invstd, double M, void* gw, void* gb,
                         S* __restrict__ gx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>(), kBU = kBUof<S>();
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ Acc part[2][2];  // this block's (sum dy, sum dy * (x - mean)), by parity
  __shared__ Acc coef[4];     // mean, w * invstd, k1, k2
  __shared__ Acc red[32];
  const uint32_t rank = cluster.block_rank();
  const int64_t G = gridDim.x / kCl, cid = blockIdx.x / kCl;
  const uint32_t chunk = (vecs + kCl - 1) / kCl;
  const uint32_t v0 = min(rank * chunk, vecs), v1 = min(v0 + chunk, vecs);
  const uint32_t T = blockDim.x;
  int it = 0;
  for (int64_t c = cid; c < C; c += G, it ^= 1) {
    const Acc mu = load_any<Acc>(mean, mdt, c);
    Acc sdy = 0, sdyx = 0;
    for (uint32_t v = v0 + threadIdx.x; v < v1; v += kBU * T) {
      BNVec<S> g[kBU], xv[kBU];
#pragma unroll
      for (int u = 0; u < kBU; ++u)
        if (v + u * T < v1) {
          const uint32_t o = bn_cl_off<S>(pl, uint32_t(c), v + u * T);
          g[u] = bn_ldv(gy, o);
          xv[u] = bn_ldv(x, o);
        }
#pragma unroll
      for (int u = 0; u < kBU; ++u)
        if (v + u * T < v1)
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const Acc gi = Num<S>::to_acc(g[u].v[i]);
            sdy += gi;
            sdyx += gi * (Num<S>::to_acc(xv[u].v[i]) - mu);
          }
    }
    sdy = block_sum(sdy, red);
    sdyx = block_sum(sdyx, red);
    if (threadIdx.x == 0) { part[it][0] = sdy; part[it][1] = sdyx; }
    cluster.sync();
    if (threadIdx.x == 0) {
      const Acc* parts[kCl];
      for (int r = 0; r < kCl; ++r) parts[r] = cluster.map_shared_rank(part[it], r);
      bn_cl_bwd_finalize<Acc>(parts, rank == 0, c, pdt, mdt, weight, mean, invstd, M, gw, gb,
                              coef);
    }
    __syncthreads();
    const Acc a = coef[1], k1 = coef[2], k2 = coef[3];
    for (uint32_t v = v0 + threadIdx.x; v < v1; v += kBU * T) {
      BNVec<S> g[kBU], xv[kBU];
      uint32_t o[kBU];
#pragma unroll
      for (int u = 0; u < kBU; ++u)
        if (v + u * T < v1) {
          o[u] = bn_cl_off<S>(pl, uint32_t(c), v + u * T);
          g[u] = bn_ldv(gy, o[u]);
          xv[u] = bn_ldv(x, o[u]);
        }
#pragma unroll
      for (int u = 0; u < kBU; ++u)
        if (v + u * T < v1) {
          BNVec<S> out;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const Acc xm = Num<S>::to_acc(xv[u].v[i]) - mu;
            out.v[i] = Num<S>::from_acc(a * (Num<S>::to_acc(g[u].v[i]) - k1 - xm * k2));
          }
          *reinterpret_cast<BNVec<S>*>(gx + o[u]) = out;
        }
    }
  }
  cluster.sync();
#endif
}

// Number of clusters G for the fused kernel `kern` touching `bytes_per_channel`
// (all tensors read twice) per channel, or 0 when the fused path is not used:
// device below sm_90 or kernel not compiled for it, G channels would not fit in
// half of L2, fewer than 8 clusters (too few SMs busy) or no cluster fits.
struct BNClusterInfo {
  std::atomic<int> state{-1};  // -1 unknown, 0 no, else max active clusters
  std::atomic<int> l2{0};
};
template <typename K>
int64_t bn_cluster_grid(K kern, BNClusterInfo (&cache)[64], int64_t C,
                        int64_t bytes_per_channel) {
  if (const char* e = getenv("FASTLAYERS_BN_NO_CLUSTER"); e && e[0] == '1') return 0;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) { cudaGetLastError(); return 0; }
  BNClusterInfo& ci = cache[dev];
  int st = ci.state.load();
  if (st < 0) {
    st = 0;
    int major = 0, l2 = 0;
    cudaFuncAttributes fa{};
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        major >= 9 && cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) == cudaSuccess &&
        cudaFuncGetAttributes(&fa, kern) == cudaSuccess && fa.ptxVersion >= 90) {
      cudaLaunchConfig_t cfg{};
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = kCl; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
      cfg.gridDim = dim3(kCl * 16);
      cfg.blockDim = dim3(kClThreads);
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      int ncl = 0;
      if (cudaOccupancyMaxActiveClusters(&ncl, kern, &cfg) == cudaSuccess && ncl > 0) st = ncl;
    }
    cudaGetLastError();  // clear any error of the queries
    ci.l2.store(l2);
    ci.state.store(st);
  }
  if (st <= 0 || bytes_per_channel <= 0) return 0;
  // Share of L2 the G channels in flight may take: 1 / FASTLAYERS_BN_L2_DIV (default 2).
  int64_t div = 2;
  if (const char* e = getenv("FASTLAYERS_BN_L2_DIV"); e && atoi(e) > 0) div = atoi(e);
  int64_t g = int64_t(ci.l2.load()) / div / bytes_per_channel;
  if (g > st) g = st;
  if (g > C) g = C;
  return g >= 8 ? g : 0;
}

template <typename K, typename... Args>
int bn_launch_cluster(K kern, int64_t G, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCl; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
  cfg.gridDim = dim3(unsigned(G * kCl));
  cfg.blockDim = dim3(kClThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kern, args...);
  if (e != cudaSuccess) cudaGetLastError();  // the caller falls back to the split kernels
  return int(e);
}



// Vectorised reductions: dense NC* (plane-contiguous), S % VEC == 0, N*S < 2^31.
template <typename S>
bool bn_planes_ok(const BNDesc& d) {
  constexpr int V = bn_vec<S>();
  return !d.channels_last && d.S > 0 && d.N > 0 && d.S % V == 0 && d.sS == 1 && d.sC == d.S &&
         d.sN == d.C * d.S && d.N * d.S < (int64_t(1) << 31);
}
template <typename S>
BNPlanes bn_planes(const BNDesc& d) {
  BNPlanes pl;
  pl.sN = d.sN; pl.sC = d.sC;
  pl.SV = uint32_t(d.S / bn_vec<S>());
  pl.dSV = FastDiv(pl.SV);
  return pl;
}
// Vectorised elementwise maps: NC*: S % VEC == 0; NHWC: C % VEC == 0; total < 2^31.
template <typename S>
bool bn_elems_ok(const BNDesc& d) {
  constexpr int V = bn_vec<S>();
  if (d.N <= 0 || d.S <= 0 || d.C <= 0 || d.N * d.C * d.S >= (int64_t(1) << 31)) return false;
  return d.channels_last ? d.C % V == 0 : d.S % V == 0;
}
template <typename S>
BNElems bn_elems(const BNDesc& d) {
  BNElems e;
  e.channels_last = d.channels_last;
  e.C = uint32_t(d.C);
  e.dC = FastDiv(uint32_t(d.C));
  e.dSV = FastDiv(uint32_t(d.channels_last ? 1 : d.S / bn_vec<S>()));
  e.dCV = FastDiv(uint32_t(d.channels_last ? d.C / bn_vec<S>() : 1));
  return e;
}

// Acc elements of the partials (the per-channel coefficients follow them): the
// larger of the NC* split kernels' and, for channels-last data, the NHWC kernels'
// (either unit width).
int64_t bn_part_elems(const BNDesc& d, DType dt) {
  int64_t e = d.C * bn_splits(d) * 3;
  if (bn_nhwc_ok(d)) {
    const int V = dt == DType::F64 ? 2 : dt == DType::F32 ? 4 : 8;
    for (int L : {1, V})
      if (d.C % L == 0) {
        const int64_t en = d.C * int64_t(bn_rows(d, L).splits) * 3;
        if (en > e) e = en;
      }
  }
  return e;
}

// Calls f(std::integral_constant<int, L>) with the NHWC unit width: 16 bytes when
// C allows it and every pointer is 16-byte aligned, else one element.
template <typename S, class F>
int bn_nhwc_dispatch(const BNDesc& d, bool aligned, F&& f) {
  constexpr int V = bn_vec<S>();
  if (aligned && d.C % V == 0) return f(std::integral_constant<int, V>{});
  return f(std::integral_constant<int, 1>{});
}

}  // namespace

int64_t batch_norm_workspace_bytes(const BNDesc& d, DType dt) {
  const int64_t acc = dt == DType::F64 ? 8 : 4;
  return (bn_part_elems(d, dt) + 4 * d.C) * acc;
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
    Acc* coef = part + bn_part_elems(d, dt);
    if (bn_nhwc_ok(d))
      return bn_nhwc_dispatch<S>(d, aligned16(x) && aligned16(y), [&](auto lt) {
        constexpr int L = decltype(lt)::value;
        const BNRows g = bn_rows(d, L);
        bn_stats_partial_nhwc<S, L><<<dim3(g.splits, g.chunks), kBNThreads, 0, stream>>>(
            g, static_cast<const S*>(x), part);
        int err = last_error();
        if (err) return err;
        bn_stats_finalize_warp<S><<<grid_for(d.C * 32, 256), 256, 0, stream>>>(
            d, pdt, part, g.splits, static_cast<const S*>(x), weight, bias, running_mean, running_var, momentum, eps,
            static_cast<Acc*>(save_mean), static_cast<Acc*>(save_invstd), coef);
        if ((err = last_error())) return err;
        bn_apply_nhwc<S, L><<<dim3(g.splits, g.chunks), kBNThreads, 0, stream>>>(
            g, static_cast<const S*>(x), coef, static_cast<S*>(y));
        return last_error();
      });
    if (bn_planes_ok<S>(d) && d.N * d.C * d.S < (int64_t(1) << 31) && aligned16(x) &&
        aligned16(y)) {
      static BNClusterInfo cache[64];
      const int64_t G = bn_cluster_grid(bn_train_fwd_cluster<S>, cache, d.C,
                                        d.N * d.S * int64_t(sizeof(S)));
      if (G > 0) {
        const BNPlanes pl = bn_planes<S>(d);
        if (bn_launch_cluster(bn_train_fwd_cluster<S>, G, stream, pl, d.C,
                              uint32_t(d.N) * pl.SV, pdt, static_cast<const S*>(x), weight, bias,
                              running_mean, running_var, momentum, eps,
                              static_cast<Acc*>(save_mean), static_cast<Acc*>(save_invstd),
                              static_cast<S*>(y)) == 0)
          return 0;
      }
    }
    if (bn_planes_ok<S>(d) && aligned16(x)) {
      const BNPlanes pl = bn_planes<S>(d);
      const uint32_t vecs = uint32_t(d.N) * pl.SV, vchunk = uint32_t(ceil_div(vecs, splits));
      bn_stats_partial_vec<S><<<dim3(unsigned(d.C), unsigned(splits)), kBNThreads, 0, stream>>>(
          pl, static_cast<const S*>(x), vecs, vchunk, part);
    } else {
      bn_stats_partial<S><<<dim3(unsigned(d.C), unsigned(splits)), kBNThreads, 0, stream>>>(
          d, static_cast<const S*>(x), chunk, part);
    }
    int err = last_error();
    if (err) return err;
    bn_stats_finalize<Acc><<<grid_for(d.C, 128), 128, 0, stream>>>(
        d, pdt, part, splits, weight, bias, running_mean, running_var, momentum, eps,
        static_cast<Acc*>(save_mean), static_cast<Acc*>(save_invstd), coef);
    if ((err = last_error())) return err;
    const int64_t total = d.N * d.C * d.S;
    if (total > 0 && bn_elems_ok<S>(d) && aligned16(x) && aligned16(y)) {
      const uint32_t vecs = uint32_t(total / bn_vec<S>());
      bn_apply_vec<S><<<grid_for(vecs, 256), 256, 0, stream>>>(
          bn_elems<S>(d), vecs, static_cast<const S*>(x), coef, static_cast<S*>(y));
    } else if (total > 0)
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
    if (bn_nhwc_ok(d))
      return bn_nhwc_dispatch<S>(d, aligned16(x) && aligned16(y), [&](auto lt) {
        constexpr int L = decltype(lt)::value;
        const BNRows g = bn_rows(d, L);
        bn_apply_nhwc<S, L><<<dim3(g.splits, g.chunks), kBNThreads, 0, stream>>>(
            g, static_cast<const S*>(x), coef, static_cast<S*>(y));
        return last_error();
      });
    const int64_t total = d.N * d.C * d.S;
    if (total > 0 && bn_elems_ok<S>(d) && aligned16(x) && aligned16(y)) {
      const uint32_t vecs = uint32_t(total / bn_vec<S>());
      bn_apply_vec<S><<<grid_for(vecs, 256), 256, 0, stream>>>(
          bn_elems<S>(d), vecs, static_cast<const S*>(x), coef, static_cast<S*>(y));
    } else if (total > 0)
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
    Acc* coef = part + bn_part_elems(d, dt);
    const bool need_sums = gw != nullptr || gb != nullptr || (gx != nullptr && training);
    int err = 0;
    if (bn_nhwc_ok(d))
      return bn_nhwc_dispatch<S>(d, aligned16(gy) && aligned16(x) && aligned16(gx), [&](auto lt) {
        constexpr int L = decltype(lt)::value;
        const BNRows g = bn_rows(d, L);
        int e = 0;
        if (need_sums) {
          bn_bwd_partial_nhwc<S, L><<<dim3(g.splits, g.chunks), kBNThreads, 0, stream>>>(
              g, mdt, static_cast<const S*>(gy), static_cast<const S*>(x), mean, part);
          if ((e = last_error())) return e;
        }
        bn_bwd_finalize_warp<Acc><<<grid_for(d.C * 32, 256), 256, 0, stream>>>(
            d, pdt, mdt, part, g.splits, weight, mean, invstd, training, need_sums, gw, gb, coef);
        if ((e = last_error())) return e;
        if (gx != nullptr)
          bn_bwd_apply_nhwc<S, L><<<dim3(g.splits, g.chunks), kBNThreads, 0, stream>>>(
              g, static_cast<const S*>(gy), static_cast<const S*>(x), coef, static_cast<S*>(gx));
        return last_error();
      });
    if (training && gx != nullptr && bn_planes_ok<S>(d) && d.N * d.C * d.S < (int64_t(1) << 31) &&
        aligned16(gy) && aligned16(x) && aligned16(gx)) {
      static BNClusterInfo cache[64];
      const int64_t G = bn_cluster_grid(bn_train_bwd_cluster<S>, cache, d.C,
                                        2 * d.N * d.S * int64_t(sizeof(S)));
      if (G > 0) {
        const BNPlanes pl = bn_planes<S>(d);
        if (bn_launch_cluster(bn_train_bwd_cluster<S>, G, stream, pl, d.C,
                              uint32_t(d.N) * pl.SV, pdt, mdt, static_cast<const S*>(gy),
                              static_cast<const S*>(x), weight, mean, invstd,
                              double(d.N * d.S), gw, gb, static_cast<S*>(gx)) == 0)
          return 0;
      }
    }
    if (need_sums && bn_planes_ok<S>(d) && aligned16(gy) && aligned16(x)) {
      const BNPlanes pl = bn_planes<S>(d);
      const uint32_t vecs = uint32_t(d.N) * pl.SV, vchunk = uint32_t(ceil_div(vecs, splits));
      bn_bwd_partial_vec<S><<<dim3(unsigned(d.C), unsigned(splits)), kBNThreads, 0, stream>>>(
          pl, mdt, static_cast<const S*>(gy), static_cast<const S*>(x), mean, vecs, vchunk, part);
      if ((err = last_error())) return err;
    } else if (need_sums) {
      bn_bwd_partial<S><<<dim3(unsigned(d.C), unsigned(splits)), kBNThreads, 0, stream>>>(
          d, mdt, static_cast<const S*>(gy), static_cast<const S*>(x), mean, chunk, part);
      if ((err = last_error())) return err;
    }
    bn_bwd_finalize<Acc><<<grid_for(d.C, 128), 128, 0, stream>>>(
        d, pdt, mdt, part, splits, weight, mean, invstd, training, need_sums, gw, gb, coef);
    if ((err = last_error())) return err;
    const int64_t total = d.N * d.C * d.S;
    if (gx != nullptr && total > 0 && bn_elems_ok<S>(d) && aligned16(gy) && aligned16(x) &&
        aligned16(gx)) {
      const uint32_t vecs = uint32_t(total / bn_vec<S>());
      bn_bwd_apply_vec<S><<<grid_for(vecs, 256), 256, 0, stream>>>(
          bn_elems<S>(d), vecs, static_cast<const S*>(gy), static_cast<const S*>(x), coef,
          static_cast<S*>(gx));
    } else if (gx != nullptr && total > 0)
      bn_bwd_apply<S><<<grid_for(total, 256), 256, 0, stream>>>(
          d, static_cast<const S*>(gy), static_cast<const S*>(x), coef, static_cast<S*>(gx));
    return last_error();
  });
}

}  // namespace fastlayers::cuda
