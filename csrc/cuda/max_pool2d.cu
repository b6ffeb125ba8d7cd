// MaxPool2d.
//  forward : one thread per output element (walked in the output's memory
//            order); writes the max and its compact offset r * kw + s inside
//            the window (uint8 or int32). Ties and NaN follow torch: the first
//            maximum wins, a NaN replaces the running max.
//  backward: one thread per INPUT element gathers grad_output from every window
//            that covers it and chose it (its stored offset points back at this
//            element). Fixed summation order, no atomics: deterministic.
//            Dense NCHW 3x3 stride-2 windows: max_pool_bwd_k3s2 (4 elements per
//            thread, no staging); other dense NCHW windows: the band kernel.
//  indices : offsets -> torch's flat int64 indices h * W + w.
#include <cmath>

#include "common.cuh"

namespace fastlayers::cuda {
namespace {

constexpr int kPoolThreads = 256;
template <typename S> struct alignas(4 * sizeof(S)) PoolVec4 { S v[4]; };


// ---- Fast paths: dense NCHW or dense NHWC tensors, dilation 1, uint8 offsets, --
// ---- fewer than 2^31 elements (32-bit index math). -----------------------------
struct PoolFast {
  int C, H, W, P, Q, kh, kw, sh, sw, ph, pw;
  FastDiv dC, dH, dW, dP, dQ, dsh, dsw;
};

inline PoolFast make_pool_fast(const PoolDesc& d) {
  PoolFast f;
  f.C = int(d.C); f.H = int(d.H); f.W = int(d.W); f.P = int(d.P); f.Q = int(d.Q);
  f.kh = int(d.kh); f.kw = int(d.kw); f.sh = int(d.sh); f.sw = int(d.sw);
  f.ph = int(d.ph); f.pw = int(d.pw);
  f.dC = FastDiv(uint32_t(d.C)); f.dH = FastDiv(uint32_t(d.H)); f.dW = FastDiv(uint32_t(d.W));
  f.dP = FastDiv(uint32_t(d.P)); f.dQ = FastDiv(uint32_t(d.Q));
  f.dsh = FastDiv(uint32_t(d.sh)); f.dsw = FastDiv(uint32_t(d.sw));
  return f;
}

// Output element t (memory order) of the forward: same scan order and update
// rule as max_pool_fwd_kernel (r, s ascending; first max wins; a NaN replaces),
// restricted to the in-bounds part of the window.
template <typename S, bool CL>
FL_HD __forceinline__ void pool_fwd_fast_elem(const PoolFast& f, uint32_t t,
                                              const S* __restrict__ x, S* __restrict__ y,
                                              uint8_t* __restrict__ off) {
  using Acc = typename Num<S>::Acc;
  int p, q;
  uint32_t xbase, xstep;  // x index of (h, w) = xbase + (h * W + w) * xstep
  if (CL) {
    const uint32_t r1 = f.dC.div(t), c = t - r1 * uint32_t(f.C);
    const uint32_t r2 = f.dQ.div(r1);
    q = int(r1 - r2 * uint32_t(f.Q));
    const uint32_t n = f.dP.div(r2);
    p = int(r2 - n * uint32_t(f.P));
    xbase = n * uint32_t(f.H) * uint32_t(f.W) * uint32_t(f.C) + c;
    xstep = uint32_t(f.C);
  } else {
    const uint32_t r1 = f.dQ.div(t);
    q = int(t - r1 * uint32_t(f.Q));
    const uint32_t nc = f.dP.div(r1);
    p = int(r1 - nc * uint32_t(f.P));
    xbase = nc * uint32_t(f.H) * uint32_t(f.W);
    xstep = 1;
  }
  const int h0 = p * f.sh - f.ph, w0 = q * f.sw - f.pw;
  const int hs = h0 > 0 ? h0 : 0, he = h0 + f.kh < f.H ? h0 + f.kh : f.H;
  const int ws = w0 > 0 ? w0 : 0, we = w0 + f.kw < f.W ? w0 + f.kw : f.W;
  Acc best = Acc(-INFINITY);
  S best_s = Num<S>::from_acc(best);
  int best_k = -1;
  for (int h = hs; h < he; ++h) {
    const uint32_t row = xbase + uint32_t(h) * uint32_t(f.W) * xstep;
    const int kr = (h - h0) * f.kw - w0;
    for (int w = ws; w < we; ++w) {
      const S vs = x[row + uint32_t(w) * xstep];
      const Acc v = Num<S>::to_acc(vs);
      if (best_k < 0 || v > best || isnan(v)) { best = v; best_s = vs; best_k = kr + w; }
    }
  }
  y[t] = best_s;
  off[t] = uint8_t(best_k < 0 ? 0 : best_k);
}

// Input element t (memory order) of the backward: the windows that can cover
// row h are p in [pstart, pend) (dilation 1), walked in the same order as
// max_pool_bwd_kernel (r ascending = p descending; s ascending = q descending).
template <typename S, bool CL>
FL_HD __forceinline__ void pool_bwd_fast_elem(const PoolFast& f, uint32_t t,
                                              const S* __restrict__ gy,
                                              const uint8_t* __restrict__ off,
                                              S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  int h, w;
  uint32_t obase, ostep;  // gy/off index of (p, q) = obase + (p * Q + q) * ostep
  if (CL) {
    const uint32_t r1 = f.dC.div(t), c = t - r1 * uint32_t(f.C);
    const uint32_t r2 = f.dW.div(r1);
    w = int(r1 - r2 * uint32_t(f.W));
    const uint32_t n = f.dH.div(r2);
    h = int(r2 - n * uint32_t(f.H));
    obase = n * uint32_t(f.P) * uint32_t(f.Q) * uint32_t(f.C) + c;
    ostep = uint32_t(f.C);
  } else {
    const uint32_t r1 = f.dW.div(t);
    w = int(t - r1 * uint32_t(f.W));
    const uint32_t nc = f.dH.div(r1);
    h = int(r1 - nc * uint32_t(f.H));
    obase = nc * uint32_t(f.P) * uint32_t(f.Q);
    ostep = 1;
  }
  const int hp = h + f.ph, wp = w + f.pw;
  int pend = int(f.dsh.div(uint32_t(hp))) + 1;
  if (pend > f.P) pend = f.P;
  const int pstart = hp < f.kh ? 0 : int(f.dsh.div(uint32_t(hp - f.kh))) + 1;
  int qend = int(f.dsw.div(uint32_t(wp))) + 1;
  if (qend > f.Q) qend = f.Q;
  const int qstart = wp < f.kw ? 0 : int(f.dsw.div(uint32_t(wp - f.kw))) + 1;
  Acc sum = Acc(0);
  for (int p = pend - 1; p >= pstart; --p) {
    const int kr = (hp - p * f.sh) * f.kw + wp;
    const uint32_t row = obase + uint32_t(p) * uint32_t(f.Q) * ostep;
    for (int q = qend - 1; q >= qstart; --q) {
      const uint32_t o = row + uint32_t(q) * ostep;
      if (int(off[o]) == kr - q * f.sw) sum += Num<S>::to_acc(gy[o]);
    }
  }
  gx[t] = Num<S>::from_acc(sum);
}

template <typename S, bool CL>
__global__ void max_pool_fwd_fast(PoolFast f, int64_t total, const S* __restrict__ x,
                                  S* __restrict__ y, uint8_t* __restrict__ off) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x)
    pool_fwd_fast_elem<S, CL>(f, uint32_t(t), x, y, off);
}

template <typename S, bool CL>
__global__ void max_pool_bwd_fast(PoolFast f, int64_t total, const S* __restrict__ gy,
                                  const uint8_t* __restrict__ off, S* __restrict__ gx) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x)
    pool_bwd_fast_elem<S, CL>(f, uint32_t(t), gy, off, gx);
}

// ---- NCHW backward for 3x3 windows with stride 2 (the ResNet stem pool) --------
// One thread per group of 4 adjacent grad_input elements of a row (j-th group:
// columns 4j .. 4j+3). They are covered by at most 2 window rows p and 3 window
// columns q; the thread loads those grad_output / offset values straight from
// global memory (small, L1/L2-resident, shared with the neighbours), then sums
// per element in the order of pool_bwd_fast_elem (p descending, q descending, same
// match test): bitwise the same results. 16-byte store when VS (W % 4 == 0 and an
// aligned gx), else one store per element. No shared memory, no barriers.
template <typename S, bool VS>
FL_HD __forceinline__ void pool_bwd_k3s2_group(const PoolFast& f, uint32_t row, uint32_t j,
                                               const S* __restrict__ gy,
                                               const uint8_t* __restrict__ off,
                                               S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  const uint32_t plane = f.dH.div(row);
  const int h = int(row - plane * uint32_t(f.H));
  const int hp = h + f.ph;
  const int pend = min(hp / 2 + 1, f.P), pstart = hp < 3 ? 0 : (hp - 3) / 2 + 1;
  const int w0 = int(j) * 4, wp0 = w0 + f.pw;
  const int qs = wp0 < 3 ? 0 : (wp0 - 3) / 2 + 1;  // first window column of the group
  const uint32_t ob = plane * uint32_t(f.P) * uint32_t(f.Q);
  // Window rows pend-1 (slot 0) and pend-2 (slot 1) when >= pstart; columns qs + k.
  Acc g[2][3];
  int o[2][3];
FL_UNROLL
  for (int a = 0; a < 2; ++a) {
    const int p = pend - 1 - a;
FL_UNROLL
    for (int k = 0; k < 3; ++k) {
      const int q = qs + k;
      const bool ok = p >= pstart && q < f.Q;
      const uint32_t i = ob + uint32_t(p) * uint32_t(f.Q) + uint32_t(q);
      o[a][k] = ok ? int(off[i]) : -1;
      g[a][k] = ok ? Num<S>::to_acc(gy[i]) : Acc(0);
    }
  }
  S out[4];
FL_UNROLL
  for (int e = 0; e < 4; ++e) {
    const int wp = wp0 + e;
    const int qend = min(wp / 2 + 1, f.Q), qstart = wp < 3 ? 0 : (wp - 3) / 2 + 1;
    Acc sum = Acc(0);
FL_UNROLL
    for (int a = 0; a < 2; ++a) {
      const int p = pend - 1 - a;
      if (p < pstart) break;
      const int kr = (hp - 2 * p) * 3 + wp;
FL_UNROLL
      for (int b = 0; b < 2; ++b) {
        const int q = qend - 1 - b;
        if (q < qstart) break;
        const int k = q - qs;  // 0..2; selects, not a dynamic index (keeps g, o in registers)
        const int ok = k == 0 ? o[a][0] : k == 1 ? o[a][1] : o[a][2];
        const Acc gk = k == 0 ? g[a][0] : k == 1 ? g[a][1] : g[a][2];
        if (ok == kr - 2 * q) sum += gk;
      }
    }
    out[e] = Num<S>::from_acc(sum);
  }
  const uint32_t xb = row * uint32_t(f.W) + uint32_t(w0);
  if (VS) {
    PoolVec4<S> v;
FL_UNROLL
    for (int e = 0; e < 4; ++e) v.v[e] = out[e];
    *reinterpret_cast<PoolVec4<S>*>(gx + xb) = v;
  } else {
FL_UNROLL
    for (int e = 0; e < 4; ++e)
      if (w0 + e < f.W) gx[xb + e] = out[e];
  }
}

template <typename S, bool VS>
__global__ void __launch_bounds__(kPoolThreads)
    max_pool_bwd_k3s2(PoolFast f, FastDiv dG, uint32_t groups, const S* __restrict__ gy,
                      const uint8_t* __restrict__ off, S* __restrict__ gx) {
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < groups;
       t += gridDim.x * blockDim.x) {
    const uint32_t row = dG.div(t);
    pool_bwd_k3s2_group<S, VS>(f, row, t - row * dG.d, gy, off, gx);
  }
}

// ---- Tiled NCHW kernels (fast layout 1). A block owns a band of rows of one
// (n, c) plane. The rows of the other side that the band needs are ONE contiguous
// range of the plane; the block copies it to shared memory with coalesced 16-byte
// loads (several in flight per thread), then every thread computes outputs of
// the band from shared memory and writes them with coalesced stores (thread i
// takes band elements i, i + blockDim, ...). Same scan/summation order as the
// per-element kernels above: bitwise the same results.
constexpr int kTileThreads = 256;
constexpr int kTileSmemBytes = 40 * 1024;  // staged bytes per block at most (< 48 KiB)
constexpr int kTileTarget = 1024;          // outputs per forward block, about
constexpr int kTileTargetBwd = 2048;       // grad_input elements per backward block, about
                                           // (its staged rows are 4x smaller: more in flight)

// Copies g[0, n) to sm[a, a + n), a = (address of g / sizeof(E)) % VEC with
// VEC = 16 / sizeof(E), so 16-byte aligned global vectors land on 16-byte aligned
// shared vectors; returns a. sm: 16-byte aligned, room for n + VEC elements; g:
// aligned to sizeof(E). Whole vectors inside [g, g + n) are copied as uint4,
// four per thread per round (independent loads in flight), the ragged ends
// element by element.
template <typename E>
__device__ __forceinline__ uint32_t stage_range(E* sm, const E* __restrict__ g, uint32_t n) {
  constexpr uint32_t V = 16 / sizeof(E);
  const uint32_t a = uint32_t(reinterpret_cast<uintptr_t>(g) / sizeof(E)) % V;
  // Slot j of sm covers sm[jV, jV + V) = g[jV - a, jV - a + V): whole for j in [jlo, jhi).
  const uint32_t jlo = a > 0 ? 1u : 0u, jhi = (n + a) / V;
  const uint4* gv = reinterpret_cast<const uint4*>(g - a);
  uint4* sv = reinterpret_cast<uint4*>(sm);
  const uint32_t nt = blockDim.x;
  for (uint32_t j = jlo + threadIdx.x; j < jhi; j += 4 * nt) {
    uint4 r[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (j + u * nt < jhi) r[u] = __ldg(gv + j + u * nt);
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (j + u * nt < jhi) sv[j + u * nt] = r[u];
  }
  // Ragged ends: g[0, head) and g[tail, n).
  const uint32_t head = min(n, jlo * V - a);
  const uint32_t tail = jhi > jlo ? max(head, jhi * V - a) : head;
  for (uint32_t i = threadIdx.x; i < head; i += nt) sm[a + i] = g[i];
  for (uint32_t i = tail + threadIdx.x; i < n; i += nt) sm[a + i] = g[i];
  return a;
}

// Forward: block = (plane, band of tp output rows). KH/KW > 0: the window size
// fixed at compile time (the loops unroll); 0: f.kh / f.kw.
template <typename S, int KH_, int KW_>
__global__ void __launch_bounds__(kTileThreads)
    max_pool_fwd_tiled(PoolFast f, uint32_t tiles, int tp, const S* __restrict__ x,
                       S* __restrict__ y, uint8_t* __restrict__ off) {
  using Acc = typename Num<S>::Acc;
  extern __shared__ __align__(16) unsigned char pool_smem[];
  S* sm = reinterpret_cast<S*>(pool_smem);
  const int KH = KH_ > 0 ? KH_ : f.kh, KW = KW_ > 0 ? KW_ : f.kw;
  const uint32_t plane = blockIdx.x / tiles, tile = blockIdx.x - plane * tiles;
  const int p0 = int(tile) * tp, p1 = min(p0 + tp, f.P);
  const int h_lo = max(p0 * f.sh - f.ph, 0), h_hi = min((p1 - 1) * f.sh - f.ph + KH, f.H);
  const uint32_t n = h_hi > h_lo ? uint32_t(h_hi - h_lo) * uint32_t(f.W) : 0u;
  const uint32_t a = stage_range<S>(
      sm, x + plane * uint32_t(f.H) * uint32_t(f.W) + uint32_t(max(h_lo, 0)) * uint32_t(f.W), n);
  __syncthreads();
  const uint32_t ob = plane * uint32_t(f.P) * uint32_t(f.Q) + uint32_t(p0) * uint32_t(f.Q);
  const uint32_t nout = uint32_t(p1 - p0) * uint32_t(f.Q);
  for (uint32_t i = threadIdx.x; i < nout; i += blockDim.x) {
    const uint32_t pr = f.dQ.div(i);
    const int q = int(i - pr * uint32_t(f.Q)), p = p0 + int(pr);
    const int h0 = p * f.sh - f.ph, w0 = q * f.sw - f.pw;
    Acc best = Acc(-INFINITY);
    S best_s = Num<S>::from_acc(best);
    int best_k = -1;
#pragma unroll
    for (int r = 0; r < KH; ++r) {
      const int h = h0 + r;
      if (h < 0 || h >= f.H) continue;
      const S* row = sm + a + uint32_t(h - h_lo) * uint32_t(f.W);
#pragma unroll
      for (int s = 0; s < KW; ++s) {
        const int w = w0 + s;
        if (w < 0 || w >= f.W) continue;
        const S vs = row[w];
        const Acc v = Num<S>::to_acc(vs);
        if (best_k < 0 || v > best || isnan(v)) { best = v; best_s = vs; best_k = r * KW + s; }
      }
    }
    y[ob + i] = best_s;
    off[ob + i] = uint8_t(best_k < 0 ? 0 : best_k);
  }
}

// Backward: block = (plane, band of th input rows); stages the grad_output and
// offset rows [pa, pb) that cover the band, then gathers as pool_bwd_fast_elem.
template <typename S>
__global__ void __launch_bounds__(kTileThreads)
    max_pool_bwd_tiled(PoolFast f, uint32_t tiles, int th, uint32_t off_smem_bytes,
                       const S* __restrict__ gy, const uint8_t* __restrict__ off,
                       S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  extern __shared__ __align__(16) unsigned char pool_smem[];
  S* smg = reinterpret_cast<S*>(pool_smem);
  uint8_t* smo = pool_smem + off_smem_bytes;  // a multiple of 16
  const uint32_t plane = blockIdx.x / tiles, tile = blockIdx.x - plane * tiles;
  const int h_a = int(tile) * th, h_b = min(h_a + th, f.H);
  // Windows p covering row h: [pstart(h), pend(h)), both non-decreasing in h.
  const int pa = h_a + f.ph < f.kh ? 0 : int(f.dsh.div(uint32_t(h_a + f.ph - f.kh))) + 1;
  const int pb = min(int(f.dsh.div(uint32_t(h_b - 1 + f.ph))) + 1, f.P);
  const uint32_t n = pb > pa ? uint32_t(pb - pa) * uint32_t(f.Q) : 0u;
  const uint32_t obase = plane * uint32_t(f.P) * uint32_t(f.Q) + uint32_t(min(pa, f.P)) * uint32_t(f.Q);
  const uint32_t ag = stage_range<S>(smg, gy + obase, n);
  const uint32_t ao = stage_range<uint8_t>(smo, off + obase, n);
  __syncthreads();
  const uint32_t xb = plane * uint32_t(f.H) * uint32_t(f.W) + uint32_t(h_a) * uint32_t(f.W);
  const uint32_t nin = uint32_t(h_b - h_a) * uint32_t(f.W);
  for (uint32_t i = threadIdx.x; i < nin; i += blockDim.x) {
    const uint32_t hr = f.dW.div(i);
    const int w = int(i - hr * uint32_t(f.W)), h = h_a + int(hr);
    const int hp = h + f.ph, wp = w + f.pw;
    const int pend = min(int(f.dsh.div(uint32_t(hp))) + 1, f.P);
    const int pstart = hp < f.kh ? 0 : int(f.dsh.div(uint32_t(hp - f.kh))) + 1;
    const int qend = min(int(f.dsw.div(uint32_t(wp))) + 1, f.Q);
    const int qstart = wp < f.kw ? 0 : int(f.dsw.div(uint32_t(wp - f.kw))) + 1;
    Acc sum = Acc(0);
    for (int p = pend - 1; p >= pstart; --p) {
      const int kr = (hp - p * f.sh) * f.kw + wp;
      const uint32_t row = uint32_t(p - pa) * uint32_t(f.Q);
      for (int q = qend - 1; q >= qstart; --q) {
        const uint32_t o = row + uint32_t(q);
        if (int(smo[ao + o]) == kr - q * f.sw) sum += Num<S>::to_acc(smg[ag + o]);
      }
    }
    gx[xb + i] = Num<S>::from_acc(sum);
  }
}

// ---- Channel-vector NHWC kernels (fast layout 2, C % VEC == 0, 16-byte aligned
// data): a thread handles VEC = 16 / sizeof(S) adjacent channels of one output
// (forward) or input (backward) position with 16-byte loads and stores; the
// window walk and the per-channel update rules are those of the scalar kernels.
template <typename S> struct alignas(16) PoolVec { S v[16 / sizeof(S)]; };
template <typename S> struct alignas(16 / sizeof(S)) PoolOffVec { uint8_t v[16 / sizeof(S)]; };

template <typename S>
__global__ void __launch_bounds__(kPoolThreads)
    max_pool_fwd_nhwc_vec(PoolFast f, FastDiv dCV, uint32_t total_vec, const S* __restrict__ x,
                          S* __restrict__ y, uint8_t* __restrict__ off) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = 16 / sizeof(S);
  const uint32_t CV = dCV.d;
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total_vec;
       t += gridDim.x * blockDim.x) {
    const uint32_t r1 = dCV.div(t), cv = t - r1 * CV;
    const uint32_t r2 = f.dQ.div(r1);
    const int q = int(r1 - r2 * uint32_t(f.Q));
    const uint32_t n = f.dP.div(r2);
    const int p = int(r2 - n * uint32_t(f.P));
    const PoolVec<S>* xv = reinterpret_cast<const PoolVec<S>*>(x) + n * uint32_t(f.H) * uint32_t(f.W) * CV + cv;
    const int h0 = p * f.sh - f.ph, w0 = q * f.sw - f.pw;
    const int hs = h0 > 0 ? h0 : 0, he = h0 + f.kh < f.H ? h0 + f.kh : f.H;
    const int ws = w0 > 0 ? w0 : 0, we = w0 + f.kw < f.W ? w0 + f.kw : f.W;
    Acc best[V];
    PoolVec<S> best_s;
    PoolOffVec<S> bk;
#pragma unroll
    for (int l = 0; l < V; ++l) { best[l] = Acc(-INFINITY); best_s.v[l] = Num<S>::from_acc(best[l]); bk.v[l] = 0; }
    bool first = true;
    for (int h = hs; h < he; ++h) {
      const int kr = (h - h0) * f.kw - w0;
      for (int w = ws; w < we; ++w) {
        const PoolVec<S> pk = xv[(uint32_t(h) * uint32_t(f.W) + uint32_t(w)) * CV];
        const uint8_t k = uint8_t(kr + w);
#pragma unroll
        for (int l = 0; l < V; ++l) {
          const Acc v = Num<S>::to_acc(pk.v[l]);
          if (first || v > best[l] || isnan(v)) { best[l] = v; best_s.v[l] = pk.v[l]; bk.v[l] = k; }
        }
        first = false;
      }
    }
    reinterpret_cast<PoolVec<S>*>(y)[t] = best_s;
    reinterpret_cast<PoolOffVec<S>*>(off)[t] = bk;
  }
}

template <typename S>
__global__ void __launch_bounds__(kPoolThreads)
    max_pool_bwd_nhwc_vec(PoolFast f, FastDiv dCV, uint32_t total_vec, const S* __restrict__ gy,
                          const uint8_t* __restrict__ off, S* __restrict__ gx) {
  using Acc = typename Num<S>::Acc;
  constexpr int V = 16 / sizeof(S);
  const uint32_t CV = dCV.d;
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < total_vec;
       t += gridDim.x * blockDim.x) {
    const uint32_t r1 = dCV.div(t), cv = t - r1 * CV;
    const uint32_t r2 = f.dW.div(r1);
    const int w = int(r1 - r2 * uint32_t(f.W));
    const uint32_t n = f.dH.div(r2);
    const int h = int(r2 - n * uint32_t(f.H));
    const uint32_t ob = n * uint32_t(f.P) * uint32_t(f.Q) * CV + cv;  // in vectors
    const PoolVec<S>* gv = reinterpret_cast<const PoolVec<S>*>(gy) + ob;
    const PoolOffVec<S>* ov = reinterpret_cast<const PoolOffVec<S>*>(off) + ob;
    const int hp = h + f.ph, wp = w + f.pw;
    const int pend = min(int(f.dsh.div(uint32_t(hp))) + 1, f.P);
    const int pstart = hp < f.kh ? 0 : int(f.dsh.div(uint32_t(hp - f.kh))) + 1;
    const int qend = min(int(f.dsw.div(uint32_t(wp))) + 1, f.Q);
    const int qstart = wp < f.kw ? 0 : int(f.dsw.div(uint32_t(wp - f.kw))) + 1;
    Acc sum[V];
#pragma unroll
    for (int l = 0; l < V; ++l) sum[l] = Acc(0);
    for (int p = pend - 1; p >= pstart; --p) {
      const int kr = (hp - p * f.sh) * f.kw + wp;
      for (int q = qend - 1; q >= qstart; --q) {
        const uint32_t o = (uint32_t(p) * uint32_t(f.Q) + uint32_t(q)) * CV;
        const PoolOffVec<S> ok = ov[o];
        const int k = kr - q * f.sw;
        bool any = false;
#pragma unroll
        for (int l = 0; l < V; ++l) any |= int(ok.v[l]) == k;
        if (!any) continue;  // skip the grad_output load
        const PoolVec<S> g = gv[o];
#pragma unroll
        for (int l = 0; l < V; ++l)
          if (int(ok.v[l]) == k) sum[l] += Num<S>::to_acc(g.v[l]);
      }
    }
    PoolVec<S> out;
#pragma unroll
    for (int l = 0; l < V; ++l) out.v[l] = Num<S>::from_acc(sum[l]);
    reinterpret_cast<PoolVec<S>*>(gx)[t] = out;
  }
}

// Band heights and shared-memory bytes of the tiled kernels; 0 rows: does not fit.
struct PoolTilePlan {
  int rows = 0;
  uint32_t tiles = 0, off_smem = 0;
  size_t smem = 0;
};
inline size_t round16(size_t b) { return (b + 15) / 16 * 16; }

PoolTilePlan plan_fwd_tiled(const PoolDesc& d, size_t elem) {
  PoolTilePlan t;
  int64_t tp = ceil_div(kTileTarget, d.Q);
  if (tp > d.P) tp = d.P;
  for (; tp >= 1; tp = tp > 1 ? tp / 2 : 0) {
    const int64_t rows_in = (tp - 1) * d.sh + d.kh;
    const size_t bytes = round16(size_t(rows_in * d.W) * elem + 16);
    if (rows_in * d.W < (int64_t(1) << 31) && bytes <= size_t(kTileSmemBytes)) {
      t.rows = int(tp);
      t.tiles = uint32_t(ceil_div(d.P, tp));
      t.smem = bytes;
      return t;
    }
  }
  return t;
}

PoolTilePlan plan_bwd_tiled(const PoolDesc& d, size_t elem) {
  PoolTilePlan t;
  int64_t th = ceil_div(kTileTargetBwd, d.W);
  if (th > d.H) th = d.H;
  for (; th >= 1; th = th > 1 ? th / 2 : 0) {
    // pend(h_b - 1) - pstart(h_a) <= (th - 1 + kh) / sh + 1 output rows.
    const int64_t rows_out = (th - 1 + d.kh) / d.sh + 2;
    const size_t gbytes = round16(size_t(rows_out * d.Q) * elem + 16);
    const size_t bytes = gbytes + round16(size_t(rows_out * d.Q) + 16);
    if (bytes <= size_t(kTileSmemBytes)) {
      t.rows = int(th);
      t.tiles = uint32_t(ceil_div(d.H, th));
      t.off_smem = uint32_t(gbytes);
      t.smem = bytes;
      return t;
    }
  }
  return t;
}

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

bool dense_as(const int64_t (&st)[4], int64_t C, int64_t H, int64_t W, bool cl) {
  if (cl) return st[1] == 1 && st[3] == C && st[2] == W * C && st[0] == H * W * C;
  return st[3] == 1 && st[2] == W && st[1] == H * W && st[0] == C * H * W;
}

inline bool aligned_to(const void* p, uintptr_t a) {
  return reinterpret_cast<uintptr_t>(p) % a == 0;
}

// 0: generic kernels; 1: fast NCHW; 2: fast NHWC. `off_str` must equal `out_str`.
int pool_fast_layout(const PoolDesc& d, bool offsets_int32) {
  constexpr int64_t kLim = int64_t(1) << 31;
  if (offsets_int32 || d.dh != 1 || d.dw != 1) return 0;
  if (d.N <= 0 || d.C <= 0 || d.H <= 0 || d.W <= 0 || d.P <= 0 || d.Q <= 0) return 0;
  if (d.N * d.C * d.H * d.W >= kLim || d.N * d.C * d.P * d.Q >= kLim) return 0;
  if (d.H >= kLim / 2 || d.W >= kLim / 2) return 0;  // h + ph, w + pw stay < 2^31
  if (d.kh * d.kw > 256 || d.sh >= kLim || d.sw >= kLim || d.ph > d.kh / 2 || d.pw > d.kw / 2)
    return 0;
  for (int i = 0; i < 4; ++i)
    if (d.off_str[i] != d.out_str[i]) return 0;
  for (int cl = 0; cl < 2; ++cl)
    if (dense_as(d.in_str, d.C, d.H, d.W, cl) && dense_as(d.out_str, d.C, d.P, d.Q, cl))
      return 1 + cl;
  return 0;
}

}  // namespace

int max_pool2d_forward(const PoolDesc& d, DType dt, const void* x, void* y, void* offsets,
                       bool offsets_int32, cudaStream_t stream) {
  const int64_t total = d.N * d.C * d.P * d.Q;
  if (total <= 0) return 0;
  return dispatch_dtype(dt, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const unsigned grid = grid_for(total, kPoolThreads);
    const int fast = pool_fast_layout(d, offsets_int32);
    if (fast) {
      const PoolFast f = make_pool_fast(d);
      constexpr int V = 16 / sizeof(S);
      const PoolTilePlan tp = fast == 1 ? plan_fwd_tiled(d, sizeof(S)) : PoolTilePlan{};
      if (tp.rows > 0) {
        const unsigned blocks = unsigned(d.N * d.C) * tp.tiles;
        auto kern = d.kh == 3 && d.kw == 3   ? max_pool_fwd_tiled<S, 3, 3>
                    : d.kh == 2 && d.kw == 2 ? max_pool_fwd_tiled<S, 2, 2>
                                             : max_pool_fwd_tiled<S, 0, 0>;
        kern<<<blocks, kTileThreads, tp.smem, stream>>>(f, tp.tiles, tp.rows,
                                                        static_cast<const S*>(x),
                                                        static_cast<S*>(y),
                                                        static_cast<uint8_t*>(offsets));
      } else if (fast == 2 && d.C % V == 0 && aligned_to(x, 16) && aligned_to(y, 16) &&
                 aligned_to(offsets, V)) {
        const uint32_t tv = uint32_t(total / V);
        max_pool_fwd_nhwc_vec<S><<<grid_for(tv, kPoolThreads), kPoolThreads, 0, stream>>>(
            f, FastDiv(uint32_t(d.C / V)), tv, static_cast<const S*>(x), static_cast<S*>(y),
            static_cast<uint8_t*>(offsets));
      } else if (fast == 2)
        max_pool_fwd_fast<S, true><<<grid, kPoolThreads, 0, stream>>>(
            f, total, static_cast<const S*>(x), static_cast<S*>(y), static_cast<uint8_t*>(offsets));
      else
        max_pool_fwd_fast<S, false><<<grid, kPoolThreads, 0, stream>>>(
            f, total, static_cast<const S*>(x), static_cast<S*>(y), static_cast<uint8_t*>(offsets));
    } else if (offsets_int32)
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
    const int fast = pool_fast_layout(d, offsets_int32);
    if (fast) {
      const PoolFast f = make_pool_fast(d);
      constexpr int V = 16 / sizeof(S);
      const PoolTilePlan tp = fast == 1 ? plan_bwd_tiled(d, sizeof(S)) : PoolTilePlan{};
      // Off with FASTLAYERS_CUDA_NEW=0 (common.cuh): the band kernel below.
      if (fast == 1 && d.kh == 3 && d.kw == 3 && d.sh == 2 && d.sw == 2 && new_paths_enabled()) {
        const uint32_t G = uint32_t(ceil_div(d.W, 4));
        const uint32_t groups = uint32_t(d.N * d.C * d.H) * G;
        auto kern = d.W % 4 == 0 && aligned_to(gx, 4 * sizeof(S)) ? max_pool_bwd_k3s2<S, true>
                                                                  : max_pool_bwd_k3s2<S, false>;
        kern<<<grid_for(groups, kPoolThreads), kPoolThreads, 0, stream>>>(
            f, FastDiv(G), groups, static_cast<const S*>(gy),
            static_cast<const uint8_t*>(offsets), static_cast<S*>(gx));
      } else if (tp.rows > 0) {
        const unsigned blocks = unsigned(d.N * d.C) * tp.tiles;
        max_pool_bwd_tiled<S><<<blocks, kTileThreads, tp.smem, stream>>>(
            f, tp.tiles, tp.rows, tp.off_smem, static_cast<const S*>(gy),
            static_cast<const uint8_t*>(offsets), static_cast<S*>(gx));
      } else if (fast == 2 && d.C % V == 0 && aligned_to(gy, 16) && aligned_to(gx, 16) &&
                 aligned_to(offsets, V)) {
        const uint32_t tv = uint32_t(total / V);
        max_pool_bwd_nhwc_vec<S><<<grid_for(tv, kPoolThreads), kPoolThreads, 0, stream>>>(
            f, FastDiv(uint32_t(d.C / V)), tv, static_cast<const S*>(gy),
            static_cast<const uint8_t*>(offsets), static_cast<S*>(gx));
      } else if (fast == 2)
        max_pool_bwd_fast<S, true><<<grid, kPoolThreads, 0, stream>>>(
            f, total, static_cast<const S*>(gy), static_cast<const uint8_t*>(offsets),
            static_cast<S*>(gx));
      else
        max_pool_bwd_fast<S, false><<<grid, kPoolThreads, 0, stream>>>(
            f, total, static_cast<const S*>(gy), static_cast<const uint8_t*>(offsets),
            static_cast<S*>(gx));
    } else if (offsets_int32)
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
