// Direct Conv2d kernels for Cg == 1 (depthwise convs, channel multipliers and
// single-channel inputs such as LeNet's conv1): output channel k reads input
// channel c = k / Kg only, so a GEMM would have an inner dimension of just
// R*S. These loops run along a contiguous dimension (W for NCHW, channels for
// NHWC) so the compiler vectorises them.
//
//  NCHW  forward      per (n, k) plane: y_row += w[k, r, s] * x_row (shifted)
//        grad_input   per (n, c) plane: dx_row += w[k, r, s] * dy_row (scatter)
//        grad_weight  per (k, r, s):   dw = sum over n, oh of dot(dy_row, x_row)
//  NHWC  forward      per (n, oh) row: y[pix, :] += w[r, s, :] * x[pix', :]
//        grad_input   per (n, ih) row, gathering the (oh, ow) that reach it
//        grad_weight  per-chunk partial sums over (n, oh) rows, summed in chunk order
// Every write target belongs to one thread: deterministic, no atomics.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "conv2d.h"

namespace fastlayers::cpu {
namespace {

// Weight [K, R, S] -> [R, S, K] so that NHWC loops read it along k.
template <typename T>
std::vector<T> weight_rsk(const ConvShape& s, const T* w) {
  const int64_t RS = s.RS();
  std::vector<T> wt(RS * s.K);
  for (int64_t k = 0; k < s.K; ++k)
    for (int64_t j = 0; j < RS; ++j) wt[j * s.K + k] = w[k * RS + j];
  return wt;
}

int64_t plane_grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

}  // namespace

template <typename T>
void direct_forward_nchw(const ConvShape& s, const T* x, const T* w, const T* b, T* y) {
  const int64_t PQ = s.PQ(), HW = s.HW(), RS = s.RS();
  at::parallel_for(0, s.N * s.K, plane_grain(PQ * RS), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.K, k = i % s.K, c = k / s.Kg;
      const T* xc = x + (n * s.C + c) * HW;
      const T* wk = w + k * RS;
      const T bv = b ? b[k] : T(0);
      for (int64_t oh = 0; oh < s.P; ++oh) {
        T* __restrict__ yr = y + i * PQ + oh * s.Q;
        std::fill(yr, yr + s.Q, bv);
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t off = q * s.dW - s.pW;
            int64_t lo, hi;
            valid_range(off, s.sW, s.W, s.Q, lo, hi);
            const T wv = wk[r * s.S + q];
            const T* __restrict__ xr = xc + ih * s.W + off;
            if (s.sW == 1) {
              for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow];
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * s.sW];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void direct_forward_nhwc(const ConvShape& s, const T* x, const T* w, const T* b, T* y) {
  const int64_t K = s.K, C = s.C, Kg = s.Kg;
  const std::vector<T> wt = weight_rsk(s, w);
  at::parallel_for(0, s.N * s.P, plane_grain(s.Q * s.RS() * K), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.P, oh = i % s.P;
      for (int64_t ow = 0; ow < s.Q; ++ow) {
        T* __restrict__ yp = y + (i * s.Q + ow) * K;
        for (int64_t k = 0; k < K; ++k) yp[k] = b ? b[k] : T(0);
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t iw = ow * s.sW - s.pW + q * s.dW;
            if (iw < 0 || iw >= s.W) continue;
            const T* __restrict__ xp = x + ((n * s.H + ih) * s.W + iw) * C;
            const T* __restrict__ wr = wt.data() + (r * s.S + q) * K;
            if (Kg == 1) {
              for (int64_t k = 0; k < K; ++k) yp[k] += wr[k] * xp[k];
            } else {
              for (int64_t c = 0; c < C; ++c)
                for (int64_t j = 0; j < Kg; ++j) yp[c * Kg + j] += wr[c * Kg + j] * xp[c];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void direct_grad_input_nchw(const ConvShape& s, const T* dy, const T* w, T* dx) {
  const int64_t PQ = s.PQ(), HW = s.HW(), RS = s.RS();
  at::parallel_for(0, s.N * s.C, plane_grain(PQ * RS * s.Kg), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.C, c = i % s.C;
      T* dxc = dx + i * HW;
      std::fill(dxc, dxc + HW, T(0));
      for (int64_t j = 0; j < s.Kg; ++j) {
        const int64_t k = c * s.Kg + j;
        const T* dyk = dy + (n * s.K + k) * PQ;
        const T* wk = w + k * RS;
        for (int64_t oh = 0; oh < s.P; ++oh) {
          const T* __restrict__ dyr = dyk + oh * s.Q;
          for (int64_t r = 0; r < s.R; ++r) {
            const int64_t ih = oh * s.sH - s.pH + r * s.dH;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t q = 0; q < s.S; ++q) {
              const int64_t off = q * s.dW - s.pW;
              int64_t lo, hi;
              valid_range(off, s.sW, s.W, s.Q, lo, hi);
              const T wv = wk[r * s.S + q];
              T* __restrict__ xr = dxc + ih * s.W + off;
              if (s.sW == 1) {
                for (int64_t ow = lo; ow < hi; ++ow) xr[ow] += wv * dyr[ow];
              } else {
                for (int64_t ow = lo; ow < hi; ++ow) xr[ow * s.sW] += wv * dyr[ow];
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
void direct_grad_input_nhwc(const ConvShape& s, const T* dy, const T* w, T* dx) {
  const int64_t K = s.K, C = s.C, Kg = s.Kg;
  const std::vector<T> wt = weight_rsk(s, w);
  at::parallel_for(0, s.N * s.H, plane_grain(s.W * s.RS() * K), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.H, ih = i % s.H;
      for (int64_t iw = 0; iw < s.W; ++iw) {
        T* __restrict__ dxp = dx + (i * s.W + iw) * C;
        std::fill(dxp, dxp + C, T(0));
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t th = ih + s.pH - r * s.dH;  // = oh * sH
          if (th < 0 || th % s.sH != 0 || th / s.sH >= s.P) continue;
          const int64_t oh = th / s.sH;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t tw = iw + s.pW - q * s.dW;  // = ow * sW
            if (tw < 0 || tw % s.sW != 0 || tw / s.sW >= s.Q) continue;
            const int64_t ow = tw / s.sW;
            const T* __restrict__ dyp = dy + ((n * s.P + oh) * s.Q + ow) * K;
            const T* __restrict__ wr = wt.data() + (r * s.S + q) * K;
            if (Kg == 1) {
              for (int64_t c = 0; c < C; ++c) dxp[c] += wr[c] * dyp[c];
            } else {
              for (int64_t c = 0; c < C; ++c) {
                T acc = 0;
                for (int64_t j = 0; j < Kg; ++j) acc += wr[c * Kg + j] * dyp[c * Kg + j];
                dxp[c] += acc;
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
void direct_grad_weight_nchw(const ConvShape& s, const T* dy, const T* x, T* dw) {
  const int64_t PQ = s.PQ(), HW = s.HW(), RS = s.RS();
  at::parallel_for(0, s.K * RS, plane_grain(s.N * PQ), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t k = i / RS, r = (i % RS) / s.S, q = i % s.S, c = k / s.Kg;
      const int64_t off = q * s.dW - s.pW;
      int64_t lo, hi;
      valid_range(off, s.sW, s.W, s.Q, lo, hi);
      double total = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        const T* dyk = dy + (n * s.K + k) * PQ;
        const T* xc = x + (n * s.C + c) * HW;
        for (int64_t oh = 0; oh < s.P; ++oh) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          const T* dyr = dyk + oh * s.Q;
          const T* xr = xc + ih * s.W + off;
          T acc = 0;
          if (s.sW == 1) {
#pragma omp simd reduction(+ : acc)
            for (int64_t ow = lo; ow < hi; ++ow) acc += dyr[ow] * xr[ow];
          } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t ow = lo; ow < hi; ++ow) acc += dyr[ow] * xr[ow * s.sW];
          }
          total += acc;
        }
      }
      dw[i] = T(total);
    }
  });
}

template <typename T>
void direct_grad_weight_nhwc(const ConvShape& s, const T* dy, const T* x, T* dw) {
  const int64_t K = s.K, C = s.C, Kg = s.Kg, RS = s.RS(), rows = s.N * s.P;
  const int64_t nchunks = planned_chunks(rows);
  std::vector<double> partial(nchunks * RS * K, 0.0);  // [chunk][r, s][k]
  run_chunks(rows, [&](int64_t chunk, int64_t i0, int64_t i1) {
    double* acc = partial.data() + chunk * RS * K;
    std::vector<T> row(RS * K);  // one output row's sums, in T, then into double
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / s.P, oh = i % s.P;
      std::fill(row.begin(), row.end(), T(0));
      for (int64_t ow = 0; ow < s.Q; ++ow) {
        const T* __restrict__ dyp = dy + (i * s.Q + ow) * K;
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t ih = oh * s.sH - s.pH + r * s.dH;
          if (ih < 0 || ih >= s.H) continue;
          for (int64_t q = 0; q < s.S; ++q) {
            const int64_t iw = ow * s.sW - s.pW + q * s.dW;
            if (iw < 0 || iw >= s.W) continue;
            const T* __restrict__ xp = x + ((n * s.H + ih) * s.W + iw) * C;
            T* __restrict__ ra = row.data() + (r * s.S + q) * K;
            if (Kg == 1) {
              for (int64_t k = 0; k < K; ++k) ra[k] += dyp[k] * xp[k];
            } else {
              for (int64_t c = 0; c < C; ++c)
                for (int64_t j = 0; j < Kg; ++j) ra[c * Kg + j] += dyp[c * Kg + j] * xp[c];
            }
          }
        }
      }
      for (int64_t j = 0; j < RS * K; ++j) acc[j] += double(row[j]);
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < RS; ++j) {
      double total = 0;
      for (int64_t c = 0; c < nchunks; ++c) total += partial[(c * RS + j) * K + k];
      dw[k * RS + j] = T(total);
    }
  }
}

#define FASTLAYERS_DIRECT_INSTANTIATE(T)                                                   \
  template void direct_forward_nchw<T>(const ConvShape&, const T*, const T*, const T*, T*); \
  template void direct_forward_nhwc<T>(const ConvShape&, const T*, const T*, const T*, T*); \
  template void direct_grad_input_nchw<T>(const ConvShape&, const T*, const T*, T*);        \
  template void direct_grad_input_nhwc<T>(const ConvShape&, const T*, const T*, T*);        \
  template void direct_grad_weight_nchw<T>(const ConvShape&, const T*, const T*, T*);       \
  template void direct_grad_weight_nhwc<T>(const ConvShape&, const T*, const T*, T*);
FASTLAYERS_DIRECT_INSTANTIATE(float)
FASTLAYERS_DIRECT_INSTANTIATE(double)
#undef FASTLAYERS_DIRECT_INSTANTIATE

}  // namespace fastlayers::cpu
