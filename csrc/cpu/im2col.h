// Tiled im2col / col2im for one image and one group, over a tile [p0, p1) of
// output pixels (pixel p = oh * Q + ow), so the column buffer stays bounded.
//
// NCHW layout: col is [Cg*R*S, p1 - p0] (row (c*R + r)*S + s holds input
//   pixel (oh*sH - pH + r*dH, ow*sW - pW + s*dW) of channel c for each output
//   pixel of the tile; zero where that lies in the padding).
// NHWC layout: col is [p1 - p0, R*S*Cg] (row = output pixel, column
//   (r*S + s)*Cg + c), so each (r, s) is a contiguous copy of Cg channels.
// col2im is the adjoint: it ADDS col back into the (pre-zeroed) input
// gradient. The loops parallelise over channels (disjoint writes); inside an
// outer parallel region they run inline.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv2d.h"
#include "gemm.h"

namespace fastlayers::cpu {

// The columns of one image and group, filled in slivers of L.R pixels
// (lanes past the tile zero), in one of two layouts:
//  packed:   the GEMM core's packed-B layout (gemm.h: PackedBLayout; K =
//            Cg*R*S rows, N = p1 - p0 pixels), so the GEMM takes the buffer as
//            packed_B and no separate packing pass reads it again (forward).
//            Buffer: gemm_packed_b_size<T>(Cg*R*S, p1 - p0) elements.
//  row-major: [Cg*R*S, im2col_nchw_ld(p1 - p0)] columns, rows ld apart
//            (ld >= im2col_nchw_ld(p1 - p0); grad_weight, which may put
//            several images' columns side by side).
template <typename T>
int64_t im2col_nchw_ld(int64_t n) {
  const int64_t R = gemm_packed_b_layout<T>().R;
  return (n + R - 1) / R * R;
}

// Column-strided convs (sW > 1) first split the input rows a tile needs by
// column phase, xs[c][b][h - h0][j] = x[c][h][j * sW + b] (b < sW, j < Wp =
// ceil(W / sW)): tap (r, q) then reads contiguous runs of phase plane
// b = (q dW - pW) mod sW, filled with vector loads as at stride 1, instead of
// a strided gather per lane (the ResNet stem, k7 s2 on 3 channels, spent
// about half as long in that gather as in its GEMM).
template <typename T>
void split_columns(const T* src, int64_t W, int64_t sW, int64_t Wp, T* dst, int64_t plane_ld) {
  if (sW == 2) {  // the common case: both phases in one pass
    T* d0 = dst;
    T* d1 = dst + plane_ld;
    const int64_t half = W / 2;
    for (int64_t j = 0; j < half; ++j) { d0[j] = src[2 * j]; d1[j] = src[2 * j + 1]; }
    if (W % 2) { d0[half] = src[W - 1]; d1[half] = T(0); }
    return;
  }
  for (int64_t b = 0; b < sW; ++b) {
    T* d = dst + b * plane_ld;
    int64_t j = 0;
    for (; j * sW + b < W; ++j) d[j] = src[j * sW + b];
    for (; j < Wp; ++j) d[j] = T(0);
  }
}

template <typename T>
void im2col_nchw_slivers(const ConvShape& s, const T* x, int64_t p0, int64_t p1,
                         const PackedBLayout& L, bool packed, T* col, int64_t ld = 0) {
  const int64_t n = p1 - p0, RS = s.RS(), K = s.Cg * RS, R = L.R;
  const int64_t Nr = (n + R - 1) / R * R;
  if (ld < Nr) ld = Nr;
  const int64_t oh0 = p0 / s.Q, ow00 = p0 % s.Q;
  // The source of channel c: x's plane (row stride W), or with sW > 1 its
  // split rows [h0, h1) (row stride Wp, one block of rows per phase b).
  const bool split = s.sW > 1;
  int64_t h0 = 0, h1 = s.H;
  if (split) {
    const int64_t oh1 = (p1 - 1) / s.Q;  // the tile's last output row
    h0 = std::clamp<int64_t>(oh0 * s.sH - s.pH, 0, s.H);
    h1 = std::clamp<int64_t>(oh1 * s.sH - s.pH + (s.R - 1) * s.dH + 1, h0, s.H);
  }
  const int64_t nh = h1 - h0, Wp = split ? (s.W + s.sW - 1) / s.sW : s.W;
  const int64_t plane = split ? s.sW * nh * Wp : s.HW();  // elements per channel
  UninitBuffer<T> xs(split ? s.Cg * plane : 0);
  // Which input element (or zero) each lane gets depends on (r, q) and the
  // pixel, not on the channel: so describe each (r, q) row once, then replay
  // the description for every channel. A sliver is a few SliverFills (one
  // per output row it covers: vector loads, see gemm_fill_b_row).
  struct Run {
    int64_t sliver, lane, len;
    int64_t src;  // offset in the channel's source, or -1: zeros
  };
  std::vector<Run> sliver_runs;
  std::vector<SliverFill> fills;
  std::vector<int64_t> first_fill(RS + 1);
  // At most one fill per sliver and per output row a sliver covers, per (r, q):
  // reserved, since growing the vector copied it about twice per tile.
  fills.reserve(RS * (Nr / R + (p1 - 1) / s.Q - oh0 + 2));
  // Moves the runs of one sliver from sliver_runs to fills (one fill per data
  // run; an all-zero sliver is one empty fill).
  auto flush = [&]() {
    if (sliver_runs.empty()) return;
    const size_t begin = fills.size();
    for (const Run& e : sliver_runs)
      if (e.src >= 0)
        fills.push_back({e.sliver, e.src, static_cast<int32_t>(e.lane),
                         static_cast<int32_t>(e.lane + e.len), false});
    if (fills.size() == begin) fills.push_back({sliver_runs[0].sliver, 0, 0, 0, false});
    fills.back().last = true;
    sliver_runs.clear();
  };
  for (int64_t r = 0; r < s.R; ++r) {
    for (int64_t q = 0; q < s.S; ++q) {
      first_fill[r * s.S + q] = static_cast<int64_t>(fills.size());
      // Output column ow of input row ih reads base + ih * Wp + off + ow (the
      // source has unit column stride: sW == 1, or split by phase).
      int64_t off = q * s.dW - s.pW, width = s.W, base = 0;
      if (split) {
        const int64_t b = ((off % s.sW) + s.sW) % s.sW;
        off = (off - b) / s.sW;
        width = (s.W - b + s.sW - 1) / s.sW;  // columns of phase b
        base = (b * nh - h0) * Wp;
      }
      int64_t lo, hi;
      valid_range(off, 1, width, s.Q, lo, hi);
      int64_t j = 0;  // pixel index inside the tile
      auto emit = [&](int64_t len, int64_t src) {  // src advances by 1 per lane
        while (len > 0) {
          const int64_t lane = j % R, m = std::min(len, R - lane);
          if (lane == 0) flush();
          sliver_runs.push_back({j / R, lane, m, src});
          j += m;
          len -= m;
          if (src >= 0) src += m;
        }
      };
      for (int64_t p = p0, oh = oh0, ow0 = ow00; p < p1; ++oh, ow0 = 0) {
        const int64_t ow1 = std::min(s.Q, ow0 + (p1 - p));
        const int64_t ih = oh * s.sH - s.pH + r * s.dH;
        if (ih < 0 || ih >= s.H) {
          emit(ow1 - ow0, -1);
        } else {
          const int64_t a = std::clamp(lo, ow0, ow1), b = std::clamp(hi, a, ow1);
          emit(a - ow0, -1);
          emit(b - a, base + ih * Wp + off + a);
          emit(ow1 - b, -1);
        }
        p += ow1 - ow0;
      }
      emit(Nr - n, -1);  // lanes past the tile
      flush();
    }
  }
  first_fill[RS] = static_cast<int64_t>(fills.size());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, RS * n));
  at::parallel_for(0, s.Cg, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const T* xc = x + c * s.HW();
      if (split) {
        T* d = xs.data() + c * plane;
        for (int64_t h = h0; h < h1; ++h)
          split_columns(xc + h * s.W, s.W, s.sW, Wp, d + (h - h0) * Wp, nh * Wp);
        xc = d;
      }
      for (int64_t rq = 0; rq < RS; ++rq) {
        const int64_t k = c * RS + rq, kb = packed ? k / L.KC * L.KC : k;
        const int64_t sl = packed ? R * std::min(L.KC, K - kb) : R;  // sliver stride
        T* const row = packed ? col + kb * Nr + (k - kb) * R : col + k * ld;
        gemm_fill_b_row<T>(fills.data() + first_fill[rq], first_fill[rq + 1] - first_fill[rq],
                           xc, plane, row, sl, R);
      }
    }
  });
}

template <typename T>
void im2col_nchw_packed(const ConvShape& s, const T* x, int64_t p0, int64_t p1,
                        const PackedBLayout& L, T* col) {
  im2col_nchw_slivers(s, x, p0, p1, L, true, col);
}

// Row-major columns [Cg*R*S, im2col_nchw_ld<T>(p1 - p0)], rows ld apart
// (0: im2col_nchw_ld<T>(p1 - p0)).
template <typename T>
void im2col_nchw(const ConvShape& s, const T* x, int64_t p0, int64_t p1, T* col,
                 int64_t ld = 0) {
  im2col_nchw_slivers(s, x, p0, p1, gemm_packed_b_layout<T>(), false, col, ld);
}

// dx: channel 0 of this group in image n; dx += col2im(col).
template <typename T>
void col2im_nchw(const ConvShape& s, const T* col, int64_t p0, int64_t p1, T* dx) {
  const int64_t ld = p1 - p0, RS = s.RS();
  const int64_t oh0 = p0 / s.Q, ow00 = p0 % s.Q;  // the tile's first output pixel
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, RS * ld));
  at::parallel_for(0, s.Cg, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* dxc = dx + c * s.HW();
      for (int64_t r = 0; r < s.R; ++r) {
        for (int64_t q = 0; q < s.S; ++q) {
          const T* src = col + ((c * s.R + r) * s.S + q) * ld;
          const int64_t off = q * s.dW - s.pW;
          int64_t lo, hi;
          valid_range(off, s.sW, s.W, s.Q, lo, hi);
          for (int64_t p = p0, oh = oh0, ow0 = ow00; p < p1; ++oh, ow0 = 0) {
            const int64_t ow1 = std::min(s.Q, ow0 + (p1 - p));
            const int64_t ih = oh * s.sH - s.pH + r * s.dH;
            if (ih >= 0 && ih < s.H) {
              T* xr = dxc + ih * s.W + off;
              const int64_t a = std::clamp(lo, ow0, ow1), b = std::clamp(hi, a, ow1);
              const T* sp = src - ow0;
              if (s.sW == 1) {
                for (int64_t ow = a; ow < b; ++ow) xr[ow] += sp[ow];
              } else {
                for (int64_t ow = a; ow < b; ++ow) xr[ow * s.sW] += sp[ow];
              }
            }
            src += ow1 - ow0;
            p += ow1 - ow0;
          }
        }
      }
    }
  });
}

// x: image n at channel g*Cg (pixels C apart). Parallel over pixels.
template <typename T>
void im2col_nhwc(const ConvShape& s, const T* x, int64_t p0, int64_t p1, T* col) {
  const int64_t Cg = s.Cg, ld = s.RS() * Cg;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, ld));
  at::parallel_for(p0, p1, grain, [&](int64_t pa, int64_t pb) {
    for (int64_t p = pa; p < pb; ++p) {
      const int64_t oh = p / s.Q, ow = p % s.Q;
      T* dst = col + (p - p0) * ld;
      for (int64_t r = 0; r < s.R; ++r) {
        const int64_t ih = oh * s.sH - s.pH + r * s.dH;
        for (int64_t q = 0; q < s.S; ++q, dst += Cg) {
          const int64_t iw = ow * s.sW - s.pW + q * s.dW;
          if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) {
            std::fill(dst, dst + Cg, T(0));
          } else {
            std::memcpy(dst, x + (ih * s.W + iw) * s.C, sizeof(T) * Cg);
          }
        }
      }
    }
  });
}

// dx: image n at channel g*Cg; dx += col2im(col). Pixels of a tile overlap in
// dx, so this parallelises over blocks of channels instead.
template <typename T>
void col2im_nhwc(const ConvShape& s, const T* col, int64_t p0, int64_t p1, T* dx) {
  const int64_t Cg = s.Cg, ld = s.RS() * Cg;
  const int64_t cgrain = std::max<int64_t>(16, Cg / std::max(1, at::get_num_threads()));
  at::parallel_for(0, Cg, cgrain, [&](int64_t c0, int64_t c1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t oh = p / s.Q, ow = p % s.Q;
      const T* src = col + (p - p0) * ld;
      for (int64_t r = 0; r < s.R; ++r) {
        const int64_t ih = oh * s.sH - s.pH + r * s.dH;
        for (int64_t q = 0; q < s.S; ++q, src += Cg) {
          const int64_t iw = ow * s.sW - s.pW + q * s.dW;
          if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
          T* d = dx + (ih * s.W + iw) * s.C;
          for (int64_t c = c0; c < c1; ++c) d[c] += src[c];
        }
      }
    }
  });
}

}  // namespace fastlayers::cpu
