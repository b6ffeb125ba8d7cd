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


#ifdef __CUDA_ARCH__
#define FL_UNROLL _Pragma("unroll")
#else
#define FL_UNROLL
#endif

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

// One thread's Welford state over its vectors v = v0, v0 + step, ... < v1: each
// vector's (VEC, mean, M2) merged in.
template <typename S>
FL_HD __forceinline__ void bn_stats_thread(const BNPlanes& pl, const S* __restrict__ x,
                                           int64_t c, uint32_t v0, uint32_t v1, uint32_t step,
                                           typename Num<S>::Acc& n, typename Num<S>::Acc& mean,
                                           typename Num<S>::Acc& m2) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>();
  for (uint32_t v = v0; v < v1; v += step) {
    const BNVec<S> pk = *reinterpret_cast<const BNVec<S>*>(x + bn_plane_vec_offset<S>(pl, c, v));
    Acc a[V], sum = Acc(0);
FL_UNROLL
    for (int i = 0; i < V; ++i) { a[i] = Num<S>::to_acc(pk.v[i]); sum += a[i]; }
    const Acc mb = sum * Acc(1.0 / V);
    Acc m2b = Acc(0);
FL_UNROLL
    for (int i = 0; i < V; ++i) { const Acc e = a[i] - mb; m2b += e * e; }
    welford_merge(n, mean, m2, Acc(V), mb, m2b);
  }
}

template <typename S>
FL_HD __forceinline__ void bn_bwd_sums_thread(const BNPlanes& pl, const S* __restrict__ gy,
                                              const S* __restrict__ x, int64_t c,
                                              typename Num<S>::Acc mu, uint32_t v0, uint32_t v1,
                                              uint32_t step, typename Num<S>::Acc& sdy,
                                              typename Num<S>::Acc& sdyx) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = bn_vec<S>();
  for (uint32_t v = v0; v < v1; v += step) {
    const int64_t o = bn_plane_vec_offset<S>(pl, c, v);
    const BNVec<S> g = *reinterpret_cast<const BNVec<S>*>(gy + o);
    const BNVec<S> xv = *reinterpret_cast<const BNVec<S>*>(x + o);
FL_UNROLL
    for (int i = 0; i < V; ++i) {
      const Acc gi = Num<S>::to_acc(g.v[i]);
      sdy += gi;
      sdyx += gi * (Num<S>::to_acc(xv.v[i]) - mu);
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
    Acc* coef = part + d.C * splits * 3;
    const bool need_sums = gw != nullptr || gb != nullptr || (gx != nullptr && training);
    int err = 0;
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
