// Conv2d as implicit GEMM (no im2col buffer): the GEMM kernels of
// gemm_kernels.cuh read their operands through the index maps below, one GEMM
// per group (blockIdx.z). Tensors are addressed through their 4 strides, so
// NCHW and channels_last inputs/outputs both work directly.
//   forward  y[n,k,p,q]   : M = K/G (k),    N = N*P*Q (n,p,q),  red = C/G*R*S (c,r,s)
//   dgrad    gx[n,c,h,w]  : M = C/G (c),    N = N*H*W (n,h,w),  red = K/G*R*S (k,r,s)
//            (gather form: gy[n,k,p,q] with p = (h + pad - r*dil) / stride when exact)
//   wgrad    gw[k,c,r,s]  : M = K/G (k),    N = C/G*R*S,        red = N*P*Q; the long
//            reduction is split over blocks and summed in a fixed order (deterministic).
// The launchers are in conv2d.cu, conv2d_dgrad.cu and conv2d_wgrad.cu (one file
// each so that they compile in parallel).
#pragma once
#include "gemm_kernels.cuh"

namespace fastlayers::cuda {

// Shape data shared by the three index maps.
struct ConvGeom {
  int64_t C, H, W, K, R, S, P, Q, sh, sw, ph, pw, dh, dw, Cg, Kg, RS, PQ, HW;
  int64_t xs[4], ws[4], ys[4];
  explicit ConvGeom(const ConvDesc& d)
      : C(d.C), H(d.H), W(d.W), K(d.K), R(d.R), S(d.S), P(d.P), Q(d.Q), sh(d.stride_h),
        sw(d.stride_w), ph(d.pad_h), pw(d.pad_w), dh(d.dil_h), dw(d.dil_w),
        Cg(d.C / d.groups), Kg(d.K / d.groups), RS(d.R * d.S), PQ(d.P * d.Q), HW(d.H * d.W) {
    for (int i = 0; i < 4; ++i) { xs[i] = d.x_str[i]; ws[i] = d.w_str[i]; ys[i] = d.y_str[i]; }
  }
  // (c, r, s) from a reduction / column index over C/G x R x S.
  FL_HD __forceinline__ void crs(int64_t k, int64_t& c, int64_t& r, int64_t& s) const {
    c = divq(k, RS);
    const int64_t t = k - c * RS;
    r = divq(t, S); s = t - r * S;
  }
  FL_HD __forceinline__ void npq(int64_t j, int64_t& n, int64_t& p, int64_t& q) const {
    n = divq(j, PQ);
    const int64_t t = j - n * PQ;
    p = divq(t, Q); q = t - p * Q;
  }
  FL_HD __forceinline__ void nhw(int64_t j, int64_t& n, int64_t& h, int64_t& w) const {
    n = divq(j, HW);
    const int64_t t = j - n * HW;
    h = divq(t, W); w = t - h * W;
  }
  // Input offset of (n, c, p*stride - pad + r*dil, ...), or -1 in the padding.
  FL_HD __forceinline__ int64_t x_at(int64_t n, int64_t c, int64_t p, int64_t q, int64_t r,
                                          int64_t s) const {
    const int64_t h = p * sh - ph + r * dh, w = q * sw - pw + s * dw;
    if (h < 0 || h >= H || w < 0 || w >= W) return -1;
    return n * xs[0] + c * xs[1] + h * xs[2] + w * xs[3];
  }
};

template <typename Tt>
struct ConvFwd {
  using T = Tt;
  using Acc = typename Num<Tt>::Acc;
  int64_t M, N, K;
  bool a_k_fast = true, b_k_fast = false;
  ConvGeom G;
  const Tt* x; const Tt* w; const Tt* bias; Tt* y;
  ConvFwd(const ConvDesc& d, const void* x_, const void* w_, const void* b_, void* y_)
      : G(d), x(static_cast<const Tt*>(x_)), w(static_cast<const Tt*>(w_)),
        bias(static_cast<const Tt*>(b_)), y(static_cast<Tt*>(y_)) {
    M = G.Kg; N = d.N * G.PQ; K = G.Cg * G.RS;
  }
  FL_HD Tt a(int g, int64_t i, int64_t k) const {
    int64_t c, r, s; G.crs(k, c, r, s);
    return w[(g * G.Kg + i) * G.ws[0] + c * G.ws[1] + r * G.ws[2] + s * G.ws[3]];
  }
  FL_HD Tt b(int g, int64_t k, int64_t j) const {
    int64_t c, r, s, n, p, q; G.crs(k, c, r, s); G.npq(j, n, p, q);
    const int64_t o = G.x_at(n, g * G.Cg + c, p, q, r, s);
    return o < 0 ? zero_of<Tt>() : x[o];
  }
  FL_HD void store(int g, int64_t i, int64_t j, Acc v) const {
    int64_t n, p, q; G.npq(j, n, p, q);
    const int64_t k = g * G.Kg + i;
    if (bias) v += Num<Tt>::to_acc(bias[k]);
    y[n * G.ys[0] + k * G.ys[1] + p * G.ys[2] + q * G.ys[3]] = Num<Tt>::from_acc(v);
  }
};

template <typename Tt>
struct ConvDgrad {
  using T = Tt;
  using Acc = typename Num<Tt>::Acc;
  int64_t M, N, K;
  bool a_k_fast = true, b_k_fast = false;
  ConvGeom G;
  const Tt* gy; const Tt* w; Tt* gx;
  ConvDgrad(const ConvDesc& d, const void* gy_, const void* w_, void* gx_)
      : G(d), gy(static_cast<const Tt*>(gy_)), w(static_cast<const Tt*>(w_)),
        gx(static_cast<Tt*>(gx_)) {
    M = G.Cg; N = d.N * G.HW; K = G.Kg * G.RS;
  }
  FL_HD Tt a(int g, int64_t i, int64_t k) const {
    int64_t kk, r, s; G.crs(k, kk, r, s);
    return w[(g * G.Kg + kk) * G.ws[0] + i * G.ws[1] + r * G.ws[2] + s * G.ws[3]];
  }
  FL_HD Tt b(int g, int64_t k, int64_t j) const {
    int64_t kk, r, s, n, h, wi; G.crs(k, kk, r, s); G.nhw(j, n, h, wi);
    const int64_t th = h + G.ph - r * G.dh, tw = wi + G.pw - s * G.dw;
    if (th < 0 || tw < 0) return zero_of<Tt>();
    const int64_t p = divq(th, G.sh), q = divq(tw, G.sw);
    if (p * G.sh != th || q * G.sw != tw || p >= G.P || q >= G.Q) return zero_of<Tt>();
    return gy[n * G.ys[0] + (g * G.Kg + kk) * G.ys[1] + p * G.ys[2] + q * G.ys[3]];
  }
  FL_HD void store(int g, int64_t i, int64_t j, Acc v) const {
    int64_t n, h, wi; G.nhw(j, n, h, wi);
    gx[n * G.xs[0] + (g * G.Cg + i) * G.xs[1] + h * G.xs[2] + wi * G.xs[3]] = Num<Tt>::from_acc(v);
  }
};

template <typename Tt>
struct ConvWgrad {
  using T = Tt;
  using Acc = typename Num<Tt>::Acc;
  int64_t M, N, K;
  bool a_k_fast = true, b_k_fast = true;
  ConvGeom G;
  const Tt* gy; const Tt* x; Tt* gw;
  ConvWgrad(const ConvDesc& d, const void* gy_, const void* x_, void* gw_)
      : G(d), gy(static_cast<const Tt*>(gy_)), x(static_cast<const Tt*>(x_)),
        gw(static_cast<Tt*>(gw_)) {
    M = G.Kg; N = G.Cg * G.RS; K = d.N * G.PQ;
  }
  FL_HD Tt a(int g, int64_t i, int64_t k) const {
    int64_t n, p, q; G.npq(k, n, p, q);
    return gy[n * G.ys[0] + (g * G.Kg + i) * G.ys[1] + p * G.ys[2] + q * G.ys[3]];
  }
  FL_HD Tt b(int g, int64_t k, int64_t j) const {
    int64_t c, r, s, n, p, q; G.crs(j, c, r, s); G.npq(k, n, p, q);
    const int64_t o = G.x_at(n, g * G.Cg + c, p, q, r, s);
    return o < 0 ? zero_of<Tt>() : x[o];
  }
  FL_HD void store(int g, int64_t i, int64_t j, Acc v) const {
    int64_t c, r, s; G.crs(j, c, r, s);
    gw[(g * G.Kg + i) * G.ws[0] + c * G.ws[1] + r * G.ws[2] + s * G.ws[3]] = Num<Tt>::from_acc(v);
  }
};

}  // namespace fastlayers::cuda
