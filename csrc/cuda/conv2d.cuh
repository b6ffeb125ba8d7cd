// Conv2d as implicit GEMM (no im2col buffer): the GEMM kernels of
// gemm_kernels.cuh read their operands through the index maps below, one GEMM
// per group (blockIdx.z). Tensors are addressed through their 4 strides, so
// NCHW and channels_last inputs/outputs both work directly.
//   forward  y[n,k,p,q]   : M = K/G (k),    N = N*P*Q (n,p,q),  red = C/G*R*S (c,r,s)
//   dgrad    gx[n,c,h,w]  : M = C/G (c),    N = N*H*W (n,h,w),  red = K/G*R*S (k,r,s)
//            (gather form: gy[n,k,p,q] with p = (h + pad - r*dil) / stride when exact)
//   wgrad    gw[k,c,r,s]  : M = K/G (k),    N = C/G*R*S,        red = N*P*Q; the long
//            reduction is split over blocks and summed in a fixed order (deterministic).
// The launchers are in conv2d.cu, conv2d_dgrad.cu (+ conv2d_dgrad_f16/bf16.cu) and
// conv2d_wgrad.cu (files of their own so that they compile in parallel).
#pragma once
#include <type_traits>

#include "gemm_kernels.cuh"

namespace fastlayers::cuda {

// Shape data shared by the three index maps.
struct ConvGeom {
  int64_t C, H, W, K, R, S, P, Q, sh, sw, ph, pw, dh, dw, Cg, Kg, RS, PQ, HW;
  int64_t xs[4], ws[4], ys[4];
  // Index decoding divides by these; when every index fits in 31 bits (small)
  // the divisions are multiply-shifts (FastDiv), else 64-bit divisions.
  bool small = false;
  FastDiv fRS, fS, fPQ, fQ, fHW, fW, fCg, fKg, fsh, fsw;
  explicit ConvGeom(const ConvDesc& d)
      : C(d.C), H(d.H), W(d.W), K(d.K), R(d.R), S(d.S), P(d.P), Q(d.Q), sh(d.stride_h),
        sw(d.stride_w), ph(d.pad_h), pw(d.pad_w), dh(d.dil_h), dw(d.dil_w),
        Cg(d.C / d.groups), Kg(d.K / d.groups), RS(d.R * d.S), PQ(d.P * d.Q), HW(d.H * d.W) {
    for (int i = 0; i < 4; ++i) { xs[i] = d.x_str[i]; ws[i] = d.w_str[i]; ys[i] = d.y_str[i]; }
    const int64_t lim = int64_t(1) << 31;
    small = d.N * PQ < lim && d.N * HW < lim && Cg * RS < lim && Kg * RS < lim &&
            H + ph < lim && W + pw < lim && RS > 0 && PQ > 0 && HW > 0 && Cg > 0 && Kg > 0;
    if (small) {
      auto f = [](int64_t v) { return FastDiv(uint32_t(v)); };
      fRS = f(RS); fS = f(S); fPQ = f(PQ); fQ = f(Q); fHW = f(HW); fW = f(W);
      fCg = f(Cg); fKg = f(Kg); fsh = f(sh); fsw = f(sw);
    }
  }
  FL_HD __forceinline__ int64_t dv(int64_t a, int64_t b, const FastDiv& f) const {
    return small ? int64_t(f.div(uint32_t(a))) : divq(a, b);
  }
  // Order of the reduction index over (channel, r, s): channel-major (c, r, s)
  // by default; (r, s, c) with the channel fastest when the gathered tensor is
  // channels_last (c_fast), so that neighbouring k are neighbours in memory.
  bool c_fast = false;
  FL_HD __forceinline__ void chrs(int64_t k, int64_t nch, int64_t& c, int64_t& r,
                                  int64_t& s) const {
    int64_t t;
    if (c_fast) { t = dv(k, nch, nch == Cg ? fCg : fKg); c = k - t * nch; }
    else { c = dv(k, RS, fRS); t = k - c * RS; }
    r = dv(t, S, fS); s = t - r * S;
  }
  // (c, r, s) from an index over C/G x R x S; (k, r, s) from one over K/G x R x S.
  FL_HD __forceinline__ void crs(int64_t k, int64_t& c, int64_t& r, int64_t& s) const {
    chrs(k, Cg, c, r, s);
  }
  FL_HD __forceinline__ void krs(int64_t k, int64_t& kk, int64_t& r, int64_t& s) const {
    chrs(k, Kg, kk, r, s);
  }
  // Memory distance between neighbouring reduction indices of a gathered image
  // with strides st (heuristic for coalescing only).
  FL_HD __forceinline__ int64_t crs_step(const int64_t* st) const {
    if (c_fast) return st[1];
    return S > 1 ? st[3] * dw : (R > 1 ? st[2] * dh : st[1]);
  }
  FL_HD __forceinline__ void npq(int64_t j, int64_t& n, int64_t& p, int64_t& q) const {
    n = dv(j, PQ, fPQ);
    const int64_t t = j - n * PQ;
    p = dv(t, Q, fQ); q = t - p * Q;
  }
  FL_HD __forceinline__ void nhw(int64_t j, int64_t& n, int64_t& h, int64_t& w) const {
    n = dv(j, HW, fHW);
    const int64_t t = j - n * HW;
    h = dv(t, W, fW); w = t - h * W;
  }
};

// Whether 32-bit element offsets suffice: every offset reachable from the
// strides of x, w and y (and their sums while gathering) stays below 2^30,
// and the index decoding is 32-bit (ConvGeom::small).
inline bool conv_index32(const ConvDesc& d) {
  auto extent = [](const int64_t (&sz)[4], const int64_t (&st)[4]) {
    int64_t e = 1;
    for (int i = 0; i < 4; ++i) e += (sz[i] > 0 ? sz[i] - 1 : 0) * (st[i] < 0 ? -st[i] : st[i]);
    return e;
  };
  const int64_t xsz[4] = {d.N, d.C, d.H + 2 * d.pad_h + d.dil_h * d.R, d.W + 2 * d.pad_w + d.dil_w * d.S};
  const int64_t wsz[4] = {d.K, d.C / (d.groups > 0 ? d.groups : 1), d.R, d.S};
  const int64_t ysz[4] = {d.N, d.K, d.P + d.H + d.pad_h + d.dil_h * d.R, d.Q + d.W + d.pad_w + d.dil_w * d.S};
  const int64_t lim = int64_t(1) << 30;
  // The coordinates themselves too (a stride 0 would leave them out of the extents).
  return xsz[2] < lim && xsz[3] < lim && ysz[2] < lim && ysz[3] < lim &&
         extent(xsz, d.x_str) < lim && extent(wsz, d.w_str) < lim && extent(ysz, d.y_str) < lim &&
         ConvGeom(d).small;
}

// Whether the launcher picks the 32-bit-index problem (float only), which is
// the one with the big tile configs; the workspace size follows the same plan.
inline bool conv_big_tiles(const ConvDesc& d, DType dt) { return dt == DType::F32 && conv_index32(d); }

// ---- operands (see gemm_kernels.cuh for the Op interface) -------------------------

// A spatial part of an address: offset plus the (h, w) it contributes. I is
// the index type: int32_t when every offset of the tensors fits (the float
// fast path: half the integer work per gathered element), else int64_t.
template <typename I>
struct SPos { I o, h, w; };

// The input image x[n, c, p*sh - ph + r*dh, q*sw - pw + s*dw] (zero in the padding)
// as forward B (mn = npq, k = crs) or weight-gradient B (mn = crs, k = npq).
// x points at the group's first channel.
template <typename Tt, bool MN_IS_NPQ, typename I = int64_t>
struct ConvXOp {
  using T = Tt;
  using U = std::make_unsigned_t<I>;
  const Tt* x;
  ConvGeom G;
  using Mn = SPos<I>;
  using Kx = SPos<I>;
  FL_HD SPos<I> npq(int64_t j) const {
    int64_t n, p, q; G.npq(j, n, p, q);
    const int64_t h = p * G.sh - G.ph, w = q * G.sw - G.pw;
    return {I(n * G.xs[0] + h * G.xs[2] + w * G.xs[3]), I(h), I(w)};
  }
  FL_HD SPos<I> crs(int64_t k) const {
    int64_t c, r, s; G.crs(k, c, r, s);
    const int64_t h = r * G.dh, w = s * G.dw;
    return {I(c * G.xs[1] + h * G.xs[2] + w * G.xs[3]), I(h), I(w)};
  }
  FL_HD Mn mn(int64_t i) const { return MN_IS_NPQ ? npq(i) : crs(i); }
  FL_HD Kx k(int64_t i) const { return MN_IS_NPQ ? crs(i) : npq(i); }
  FL_HD Tt load(const SPos<I>& a, const SPos<I>& b) const {
    const I h = a.h + b.h, w = a.w + b.w;
    if (U(h) >= U(G.H) || U(w) >= U(G.W)) return zero_of<Tt>();
    return x[a.o + b.o];
  }
};

// The weight as forward A (mn = k_out, k = crs) or input-gradient A
// (mn = c, k = (k_out, r, s)); w points at the group's first output channel.
template <typename Tt, bool FWD, typename I = int64_t>
struct ConvWOp {
  using T = Tt;
  const Tt* w;
  ConvGeom G;
  struct Mn { I o; };
  struct Kx { I o; };
  FL_HD Mn mn(int64_t i) const { return {I(i * (FWD ? G.ws[0] : G.ws[1]))}; }
  FL_HD Kx k(int64_t k) const {
    int64_t a, r, s;
    if (FWD) G.crs(k, a, r, s); else G.krs(k, a, r, s);
    return {I(a * (FWD ? G.ws[1] : G.ws[0]) + r * G.ws[2] + s * G.ws[3])};
  }
  FL_HD Tt load(const Mn& a, const Kx& b) const { return w[a.o + b.o]; }
};

// grad_output as weight-gradient A: mn = k_out, k = npq; gy at the group's first channel.
template <typename Tt, typename I = int64_t>
struct ConvYOp {
  using T = Tt;
  const Tt* gy;
  ConvGeom G;
  struct Mn { I o; };
  struct Kx { I o; };
  FL_HD Mn mn(int64_t i) const { return {I(i * G.ys[1])}; }
  FL_HD Kx k(int64_t j) const {
    int64_t n, p, q; G.npq(j, n, p, q);
    return {I(n * G.ys[0] + p * G.ys[2] + q * G.ys[3])};
  }
  FL_HD Tt load(const Mn& a, const Kx& b) const { return gy[a.o + b.o]; }
};

// grad_output gathered for the input gradient (B: mn = nhw, k = (k_out, r, s)):
// gy[n, k, p, q] with p = (h + ph - r*dh) / sh, q = (w + pw - s*dw) / sw where
// those divisions are exact and in range, else zero. With unit stride the
// offsets split like the input image's; otherwise the division happens per element.
template <typename Tt, bool UNIT, typename I = int64_t>
struct ConvGyOp {
  using T = Tt;
  using U = std::make_unsigned_t<I>;
  const Tt* gy;
  ConvGeom G;
  using Mn = SPos<I>;
  using Kx = SPos<I>;
  FL_HD SPos<I> mn(int64_t j) const {
    int64_t n, h, w; G.nhw(j, n, h, w);
    const int64_t th = h + G.ph, tw = w + G.pw;
    return {I(n * G.ys[0] + (UNIT ? th * G.ys[2] + tw * G.ys[3] : 0)), I(th), I(tw)};
  }
  FL_HD SPos<I> k(int64_t k) const {
    int64_t kk, r, s; G.krs(k, kk, r, s);
    const int64_t h = r * G.dh, w = s * G.dw;
    return {I(kk * G.ys[1] - (UNIT ? h * G.ys[2] + w * G.ys[3] : 0)), I(-h), I(-w)};
  }
  FL_HD Tt load(const SPos<I>& a, const SPos<I>& b) const {
    const I th = a.h + b.h, tw = a.w + b.w;
    if (UNIT) {
      if (U(th) >= U(G.P) || U(tw) >= U(G.Q)) return zero_of<Tt>();
      return gy[a.o + b.o];
    }
    if (th < 0 || tw < 0) return zero_of<Tt>();
    const int64_t p = G.dv(th, G.sh, G.fsh), q = G.dv(tw, G.sw, G.fsw);
    if (p * G.sh != th || q * G.sw != tw || p >= G.P || q >= G.Q) return zero_of<Tt>();
    return gy[a.o + b.o + I(p * G.ys[2] + q * G.ys[3])];
  }
};

// ---- the three problems ----------------------------------------------------------

template <typename Tt, typename I = int64_t>
struct ConvFwd {
  using T = Tt;
  using AOp = ConvWOp<Tt, true, I>;
  using BOp = ConvXOp<Tt, true, I>;
  static constexpr bool kLightOperands = false;
  static constexpr bool kBigTiles = sizeof(I) == 4;   // 64-bit indices: 64x64 tiles only
  int64_t M, N, K;
  bool a_k_fast, b_k_fast;
  ConvGeom G;
  const Tt* x; const Tt* w;
  Tt* c; bool accumulate = false; const Tt* bias_m; const Tt* bias_n = nullptr;
  ConvFwd(const ConvDesc& d, const void* x_, const void* w_, const void* b_, void* y_)
      : G(d), x(static_cast<const Tt*>(x_)), w(static_cast<const Tt*>(w_)),
        c(static_cast<Tt*>(y_)), bias_m(static_cast<const Tt*>(b_)) {
    G.c_fast = G.xs[1] < G.xs[3];
    M = G.Kg; N = d.N * G.PQ; K = G.Cg * G.RS;
    a_k_fast = (G.c_fast ? G.ws[1] : G.S > 1 ? G.ws[3] : G.R > 1 ? G.ws[2] : G.ws[1]) < G.ws[0];
    b_k_fast = G.crs_step(G.xs) < G.xs[3] * G.sw;
  }
  FL_HD AOp a_op(int g) const { return {w + g * G.Kg * G.ws[0], G}; }
  FL_HD BOp b_op(int g) const { return {x + g * G.Cg * G.xs[1], G}; }
  FL_HD int64_t c_row(int g, int64_t i) const { return (g * G.Kg + i) * G.ys[1]; }
  FL_HD int64_t c_col(int, int64_t j) const {
    int64_t n, p, q; G.npq(j, n, p, q);
    return n * G.ys[0] + p * G.ys[2] + q * G.ys[3];
  }
};

template <typename Tt, bool UNIT, typename I = int64_t>
struct ConvDgradT {
  using T = Tt;
  using AOp = ConvWOp<Tt, false, I>;
  using BOp = ConvGyOp<Tt, UNIT, I>;
  static constexpr bool kLightOperands = false;
  static constexpr bool kBigTiles = sizeof(I) == 4;   // 64-bit indices: 64x64 tiles only
  int64_t M, N, K;
  bool a_k_fast, b_k_fast;
  ConvGeom G;
  const Tt* gy; const Tt* w;
  Tt* c; bool accumulate = false; const Tt* bias_m = nullptr; const Tt* bias_n = nullptr;
  ConvDgradT(const ConvDesc& d, const void* gy_, const void* w_, void* gx_)
      : G(d), gy(static_cast<const Tt*>(gy_)), w(static_cast<const Tt*>(w_)),
        c(static_cast<Tt*>(gx_)) {
    G.c_fast = G.ys[1] < G.ys[3];   // channels_last grad_output: k_out fastest in k
    M = G.Cg; N = d.N * G.HW; K = G.Kg * G.RS;
    a_k_fast = (G.c_fast ? G.ws[0] : G.S > 1 ? G.ws[3] : G.R > 1 ? G.ws[2] : G.ws[0]) < G.ws[1];
    b_k_fast = G.c_fast;
  }
  FL_HD AOp a_op(int g) const { return {w + g * G.Kg * G.ws[0], G}; }
  FL_HD BOp b_op(int g) const { return {gy + g * G.Kg * G.ys[1], G}; }
  FL_HD int64_t c_row(int g, int64_t i) const { return (g * G.Cg + i) * G.xs[1]; }
  FL_HD int64_t c_col(int, int64_t j) const {
    int64_t n, h, w; G.nhw(j, n, h, w);
    return n * G.xs[0] + h * G.xs[2] + w * G.xs[3];
  }
};

template <typename Tt, typename I = int64_t>
struct ConvWgrad {
  using T = Tt;
  using AOp = ConvYOp<Tt, I>;
  using BOp = ConvXOp<Tt, false, I>;
  static constexpr bool kLightOperands = false;
  static constexpr bool kBigTiles = sizeof(I) == 4;   // 64-bit indices: 64x64 tiles only
  int64_t M, N, K;
  bool a_k_fast, b_k_fast;
  ConvGeom G;
  const Tt* gy; const Tt* x;
  Tt* c; bool accumulate = false; const Tt* bias_m = nullptr; const Tt* bias_n = nullptr;
  ConvWgrad(const ConvDesc& d, const void* gy_, const void* x_, void* gw_)
      : G(d), gy(static_cast<const Tt*>(gy_)), x(static_cast<const Tt*>(x_)),
        c(static_cast<Tt*>(gw_)) {
    G.c_fast = G.xs[1] < G.xs[3];
    M = G.Kg; N = G.Cg * G.RS; K = d.N * G.PQ;
    a_k_fast = G.ys[3] < G.ys[1];                 // NCHW grad_output: q is contiguous
    b_k_fast = G.xs[3] * G.sw < G.crs_step(G.xs);
  }
  FL_HD AOp a_op(int g) const { return {gy + g * G.Kg * G.ys[1], G}; }
  FL_HD BOp b_op(int g) const { return {x + g * G.Cg * G.xs[1], G}; }
  FL_HD int64_t c_row(int g, int64_t i) const { return (g * G.Kg + i) * G.ws[0]; }
  FL_HD int64_t c_col(int, int64_t j) const {
    int64_t cc, r, s; G.crs(j, cc, r, s);
    return cc * G.ws[1] + r * G.ws[2] + s * G.ws[3];
  }
};

// The input gradient for element type T. conv2d_dgrad.cu runs it; the half and bfloat16
// instantiations (whose tensor-core kernels take ptxas longest) are made in
// conv2d_dgrad_f16.cu and conv2d_dgrad_bf16.cu, so that nvcc compiles them in parallel.
template <typename T>
int run_conv2d_dgrad(const ConvDesc& d, DType dt, const void* gy, const void* w, void* gx,
                     void* workspace, cudaStream_t stream) {
  const bool unit = d.stride_h == 1 && d.stride_w == 1;
  if constexpr (std::is_same_v<T, float>)
    if (unit && conv_index32(d))
      return run_gemm(ConvDgradT<T, true, int32_t>(d, gy, w, gx), d.groups, dt, workspace, stream);
  if (unit)
    return run_gemm(ConvDgradT<T, true>(d, gy, w, gx), d.groups, dt, workspace, stream);
  return run_gemm(ConvDgradT<T, false>(d, gy, w, gx), d.groups, dt, workspace, stream);
}
#define FL_CONV_DGRAD_INSTANCE(T)                                                         \
  int run_conv2d_dgrad<T>(const ConvDesc&, DType, const void*, const void*, void*, void*, \
                          cudaStream_t)

}  // namespace fastlayers::cuda
