// Template SIMD MaxPool2d forward algorithm (see max_pool2d_kernels.h).
// Include only after `#pragma GCC target(...)`, with FL_POOL_SIMD_IMPL set to
// a namespace name unique to the ISA (no template is shared between ISAs).
#include "max_pool2d_kernels.h"

namespace fastlayers::cpu {
namespace FL_POOL_SIMD_IMPL {

template <class Vt>
inline void store_offsets(void* off, bool off32, int64_t i, typename Vt::I idx, int64_t n) {
  if (n == Vt::W) {
    if (off32) Vt::store_i32(static_cast<int32_t*>(off) + i, idx);
    else Vt::store_u8(static_cast<uint8_t*>(off) + i, idx);
    return;
  }
  alignas(64) int32_t t[Vt::W];
  Vt::store_i32(t, idx);
  for (int64_t j = 0; j < n; ++j) {
    if (off32) static_cast<int32_t*>(off)[i + j] = t[j];
    else static_cast<uint8_t*>(off)[i + j] = static_cast<uint8_t>(t[j]);
  }
}

// Running max step, torch's rule: take v where (v > m) || isnan(v).
template <class Vt>
inline void update(typename Vt::V v, int32_t o, typename Vt::V& m, typename Vt::I& idx) {
  auto u = Vt::upd(v, m);
  m = Vt::blend(m, v, u);
  idx = Vt::blendi(idx, Vt::seti(o), u);
}

// MODE 1: stride 1 (plain loads), 2: stride 2 (deinterleave), 3: stride 2 and
// dilation 1 (one deinterleave gives two taps), 0: gather.
template <class Vt, int MODE>
void pool_rows(const PoolRowsArgs& a) {
  constexpr int W = Vt::W;
  using V = typename Vt::V;
  using I = typename Vt::I;
  // Locals: the stores below could otherwise force reloads of the fields.
  const int64_t ldb = a.ldb, OW = a.OW, kH = a.kH, kW = a.kW, sH = a.sH, sW = a.sW;
  const int64_t dH = a.dH, dW = a.dW, ldo = a.ldo;
  const I lanes = Vt::lane_mul(static_cast<int32_t>(sW));
  const V ninf = Vt::set1(-__builtin_inff());
  for (int64_t r = 0; r < a.nrows; ++r) {
    const float* rb = a.buf + r * sH * ldb;
    const I row_init = Vt::seti(a.kh0[r]);
    float* orow = a.out + r * ldo;
    for (int64_t ow = 0; ow < OW; ow += W) {
      V m = ninf;
      I idx = Vt::addi(row_init, Vt::loadi(a.kw0 + ow));
      int32_t o = 0;
      for (int64_t kh = 0; kh < kH; ++kh) {
        const float* p = rb + kh * dH * ldb + ow * sW;
        if constexpr (MODE == 3) {  // stride 2, dilation 1: taps kw, kw + 1 share loads
          for (int64_t kw = 0; kw < kW; kw += 2) {
            V ev, od;
            Vt::load_s2_pair(p + kw, ev, od);
            update<Vt>(ev, o++, m, idx);
            if (kw + 1 < kW) update<Vt>(od, o++, m, idx);
          }
        } else {
          for (int64_t kw = 0; kw < kW; ++kw, ++o) {
            const float* q = p + kw * dW;
            V v = MODE == 1 ? Vt::load(q) : MODE == 2 ? Vt::load_s2(q) : Vt::gather(q, lanes);
            update<Vt>(v, o, m, idx);
          }
        }
      }
      const int64_t n = OW - ow < W ? OW - ow : W;
      if (n == W) {
        Vt::store(orow + ow, m);
      } else {
        alignas(64) float t[W];
        Vt::store(t, m);
        for (int64_t j = 0; j < n; ++j) orow[ow + j] = t[j];
      }
      store_offsets<Vt>(a.off, a.off32, r * ldo + ow, idx, n);
    }
  }
}

template <class Vt>
void pool_rows_any(const PoolRowsArgs& a) {
  if (a.sW == 1) pool_rows<Vt, 1>(a);
  else if (a.sW == 2 && a.dW == 1) pool_rows<Vt, 3>(a);
  else if (a.sW == 2) pool_rows<Vt, 2>(a);
  else pool_rows<Vt, 0>(a);
}

template <class Vt>
void pool_pixel(const PoolPixelArgs& a) {
  constexpr int W = Vt::W;
  using V = typename Vt::V;
  const V ninf = Vt::set1(-__builtin_inff());
  int64_t c = 0;
  for (; c + W <= a.C; c += W) {
    V m = ninf;
    typename Vt::I idx = Vt::seti(a.init);
    for (int64_t t = 0; t < a.ntaps; ++t) {
      V v = Vt::load(a.in + a.tap[t] + c);
      update<Vt>(v, a.tap_o[t], m, idx);
    }
    Vt::store(a.out + c, m);
    store_offsets<Vt>(a.off, a.off32, c, idx, W);
  }
  if (c < a.C) {  // channel tail: masked loads, partial stores
    const int64_t n = a.C - c;
    V m = ninf;
    typename Vt::I idx = Vt::seti(a.init);
    for (int64_t t = 0; t < a.ntaps; ++t) {
      update<Vt>(Vt::load_n(a.in + a.tap[t] + c, n), a.tap_o[t], m, idx);
    }
    alignas(64) float tv[W];
    Vt::store(tv, m);
    for (int64_t j = 0; j < n; ++j) a.out[c + j] = tv[j];
    store_offsets<Vt>(a.off, a.off32, c, idx, n);
  }
}

}  // namespace FL_POOL_SIMD_IMPL
}  // namespace fastlayers::cpu
