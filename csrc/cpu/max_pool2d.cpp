// MaxPool2d on the CPU (4-D input, NCHW or channels-last), same results as
// torch.nn.functional.max_pool2d(..., return_indices=True).
//
// Forward keeps, per output, the offset of the max INSIDE its window
// (kh * kW + kw; uint8 when kH * kW <= 256, else int32) instead of torch's
// int64 flat input index. Max rule as torch: running max starts at -inf with
// the offset of the first window position inside the input, an element wins
// when (v > max) || isnan(v) (first max wins ties, the last NaN wins).
//   NCHW, float, SIMD: a band of input rows is copied into a buffer padded
//     with -inf, then SIMD across output columns (max_pool2d_simd.h).
//   NCHW, float, SIMD, 2x2 / stride 2 and 3-wide / column stride 2 windows
//     (LeNet's k2, ResNet's k3 s2 p1): row kernels read the input rows
//     directly; big outputs are streamed out (kStreamBytes).
//   channels-last, float, SIMD: per output pixel, SIMD across channels.
//   scalar path (ISA "scalar" and float64): the plain loop below.
// max_pool2d (the op) is the forward without offsets, for calls autograd does
// not record: the k2s2 / k3s2 kernels then only take maxima.
// A window with no element inside the input (possible with dilation, e.g.
// H = 1, k = 2, d = 2, p = 1) gives -inf with the offset torch's rule gives
// (first window position at or after row/column 0, which lies past the input);
// max_pool2d_indices maps it to the same index torch reports, and backward
// sends no gradient from such an output (torch would write out of bounds).
//
// Backward: grad_input = 0, then each grad_output is added at its argmax.
// Deterministic without atomics: one thread owns each (n, c) plane (NCHW) or
// each (n, channel block) (channels-last) and walks it in order. Big NCHW
// gradients are built per plane in a buffer and streamed out.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "alloc.h"
#include "common.h"
#include "isa.h"
#include "max_pool2d_kernels.h"
#include "stream_copy.h"

namespace fastlayers {
namespace {

using cpu::PoolPixelArgs;
using cpu::PoolRowsArgs;

// Outputs this big are written with streaming stores (SIMD ISAs): planes are
// computed into a thread-local buffer (planes up to kStreamPlaneBytes), then
// streamed out, so the output is not read from memory before being written.
using cpu::kStreamBytes;
using cpu::kStreamPlaneBytes;

struct Geom {
  int64_t N, C, H, W, OH, OW;
  int64_t kH, kW, sH, sW, pH, pW, dH, dW;
  int64_t taps() const { return kH * kW; }
  bool off32() const { return taps() > 256; }
};

int64_t div_floor(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// torch's pooling_output_shape (incl. the ceil_mode rule: the last window
// must start inside the input or the left padding).
int64_t out_size(int64_t in, int64_t k, int64_t p, int64_t s, int64_t d, bool ceil_mode) {
  int64_t o = div_floor(in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0), s) + 1;
  if (ceil_mode && (o - 1) * s >= in + p) --o;
  return o;
}

void check_params(at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                  const char* op) {
  TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2 && d.size() == 2, "fastlayers.", op,
              ": kernel_size, stride, padding and dilation must have 2 elements each");
  TORCH_CHECK(k[0] > 0 && k[1] > 0, "fastlayers.", op,
              ": kernel size should be greater than zero, but got kH: ", k[0], " kW: ", k[1]);
  TORCH_CHECK(s[0] != 0 && s[1] != 0, "fastlayers.", op, ": stride should not be zero");
  TORCH_CHECK(s[0] > 0 && s[1] > 0, "fastlayers.", op,
              ": stride should be greater than zero, but got dH: ", s[0], " dW: ", s[1]);
  TORCH_CHECK(d[0] > 0 && d[1] > 0, "fastlayers.", op,
              ": dilation should be greater than zero, but got dilationH: ", d[0],
              " dilationW: ", d[1]);
  TORCH_CHECK(p[0] >= 0 && p[1] >= 0, "fastlayers.", op, ": pad must be non-negative, but got pad: ",
              p[0] < 0 ? p[0] : p[1]);
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK(p[i] <= ((k[i] - 1) * d[i] + 1) / 2, "fastlayers.", op,
                ": pad should be at most half of effective kernel size, but got pad=", p[i],
                ", kernel_size=", k[i], " and dilation=", d[i]);
  TORCH_CHECK(k[1] / 2 >= p[1] && k[0] / 2 >= p[0], "fastlayers.", op,
              ": pad should be smaller than or equal to half of kernel size, but got padW = ", p[1],
              ", padH = ", p[0], ", kW = ", k[1], ", kH = ", k[0]);
}

Geom make_geom(at::IntArrayRef size, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
               at::IntArrayRef d) {
  Geom g;
  g.N = size[0]; g.C = size[1]; g.H = size[2]; g.W = size[3];
  g.kH = k[0]; g.kW = k[1]; g.sH = s[0]; g.sW = s[1];
  g.pH = p[0]; g.pW = p[1]; g.dH = d[0]; g.dW = d[1];
  return g;
}

// First kernel index whose position (start + k * d) is >= 0 (torch's while loop).
inline int64_t first_k(int64_t start, int64_t d) { return start >= 0 ? 0 : (-start + d - 1) / d; }

// Output (oh, ow) range whose windows lie entirely inside the input: there
// any offset < kH * kW names a valid position and no bounds check is needed.
struct Interior {
  int64_t oh0, oh1, ow0, ow1;  // [oh0, oh1) x [ow0, ow1)
  bool has(int64_t oh, int64_t ow) const { return oh >= oh0 && oh < oh1 && ow >= ow0 && ow < ow1; }
};

Interior interior(const Geom& g) {
  auto range = [](int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, int64_t d,
                  int64_t& lo, int64_t& hi) {
    lo = (p + s - 1) / s;  // first o with o * s - p >= 0
    const int64_t last = in - 1 - (k - 1) * d + p;  // o * s <= last
    hi = last < 0 ? 0 : std::min(out, last / s + 1);
    if (hi < lo) hi = lo;
  };
  Interior r;
  range(g.H, g.OH, g.kH, g.sH, g.pH, g.dH, r.oh0, r.oh1);
  range(g.W, g.OW, g.kW, g.sW, g.pW, g.dW, r.ow0, r.ow1);
  return r;
}

// ---- forward, scalar path (also float64) ---------------------------------

template <typename T, typename O>
void forward_plane_scalar(const T* in, T* out, O* off, const Geom& g) {
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    const int64_t h0 = oh * g.sH - g.pH, kh0 = first_k(h0, g.dH);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t w0 = ow * g.sW - g.pW, kw0 = first_k(w0, g.dW);
      T m = -std::numeric_limits<T>::infinity();
      int64_t idx = kh0 * g.kW + kw0;
      for (int64_t kh = kh0; kh < g.kH; ++kh) {
        const int64_t ih = h0 + kh * g.dH;
        if (ih >= g.H) break;
        for (int64_t kw = kw0; kw < g.kW; ++kw) {
          const int64_t iw = w0 + kw * g.dW;
          if (iw >= g.W) break;
          const T v = in[ih * g.W + iw];
          if (v > m || std::isnan(v)) { m = v; idx = kh * g.kW + kw; }
        }
      }
      out[oh * g.OW + ow] = m;
      off[oh * g.OW + ow] = static_cast<O>(idx);
    }
  }
}

// Channels-last scalar: one output pixel, all channels.
template <typename T, typename O>
void forward_pixel_scalar(const T* in, int64_t C, const int64_t* tap, const int32_t* tap_o,
                          int64_t ntaps, int32_t init, T* out, O* off) {
  for (int64_t c = 0; c < C; ++c) {
    T m = -std::numeric_limits<T>::infinity();
    int32_t idx = init;
    for (int64_t t = 0; t < ntaps; ++t) {
      const T v = in[tap[t] + c];
      if (v > m || std::isnan(v)) { m = v; idx = tap_o[t]; }
    }
    out[c] = m;
    off[c] = static_cast<O>(idx);
  }
}

// ---- forward drivers -----------------------------------------------------

template <typename T, typename O>
void forward_nchw_scalar(const at::Tensor& in, at::Tensor& out, at::Tensor& off, const Geom& g) {
  const T* x = in.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  O* o = static_cast<O*>(off.data_ptr());
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl)
      forward_plane_scalar<T, O>(x + pl * g.H * g.W, y + pl * g.OH * g.OW, o + pl * g.OH * g.OW, g);
  });
}

// NCHW float SIMD: work items are (plane, band of output rows); each thread
// copies the band's input rows into a -inf padded buffer and runs the ISA kernel.
void forward_nchw_simd(const at::Tensor& in, at::Tensor& out, at::Tensor& off, const Geom& g,
                       cpu::Isa isa) {
  constexpr int64_t kMaxLanes = 16;
  const int64_t OWv = (g.OW + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
  const int64_t ldb = OWv * g.sW + (g.kW - 1) * g.dW + 2 * kMaxLanes;
  const int64_t effH = (g.kH - 1) * g.dH + 1;
  // Band height: buffer around 64 KiB, and enough items to feed the threads.
  int64_t band = std::max<int64_t>(1, ((16384 / ldb) - effH) / g.sH + 1);
  band = std::min(band, g.OH);
  const int64_t planes = g.N * g.C;
  const int64_t want = 4 * at::get_num_threads();
  if (planes * ((g.OH + band - 1) / band) < want) {
    const int64_t nb = std::min(g.OH, (want + planes - 1) / planes);
    band = (g.OH + nb - 1) / nb;
  }
  const int64_t nbands = (g.OH + band - 1) / band;
  const int64_t buf_rows = (band - 1) * g.sH + effH;

  std::vector<int32_t> kw0(OWv), kh0(g.OH);
  for (int64_t ow = 0; ow < OWv; ++ow)
    kw0[ow] = static_cast<int32_t>(first_k(ow * g.sW - g.pW, g.dW));
  for (int64_t oh = 0; oh < g.OH; ++oh)
    kh0[oh] = static_cast<int32_t>(first_k(oh * g.sH - g.pH, g.dH) * g.kW);

  const float* x = in.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  char* o = static_cast<char*>(off.data_ptr());
  const int64_t osz = off.element_size();
  const float ninf = -std::numeric_limits<float>::infinity();
  auto kernel = isa == cpu::Isa::Avx512 ? &cpu::max_pool2d_rows_avx512 : &cpu::max_pool2d_rows_avx2;

  at::parallel_for(0, planes * nbands, 1, [&](int64_t b, int64_t e) {
    // Columns outside [pW, pW + W) are -inf for good; rows outside the input
    // get -inf in that range too.
    std::vector<float> buf(buf_rows * ldb, ninf);
    for (int64_t item = b; item < e; ++item) {
      const int64_t pl = item / nbands, oh0 = (item % nbands) * band;
      const int64_t nrows = std::min(band, g.OH - oh0);
      const float* xp = x + pl * g.H * g.W;
      const int64_t rows = (nrows - 1) * g.sH + effH;
      for (int64_t r = 0; r < rows; ++r) {
        float* br = buf.data() + r * ldb;
        const int64_t ih = oh0 * g.sH - g.pH + r;
        if (ih < 0 || ih >= g.H) std::fill(br + g.pW, br + g.pW + g.W, ninf);
        else std::copy(xp + ih * g.W, xp + (ih + 1) * g.W, br + g.pW);
      }
      PoolRowsArgs a;
      a.buf = buf.data(); a.ldb = ldb; a.nrows = nrows;
      a.OW = g.OW; a.kH = g.kH; a.kW = g.kW; a.sH = g.sH; a.sW = g.sW; a.dH = g.dH; a.dW = g.dW;
      a.kh0 = kh0.data() + oh0;
      a.kw0 = kw0.data();
      a.out = y + pl * g.OH * g.OW + oh0 * g.OW;
      a.ldo = g.OW;
      a.off = o + (pl * g.OH * g.OW + oh0 * g.OW) * osz;
      a.off32 = g.off32();
      kernel(a);
    }
  });
}

// Channels-last: items are (n, output row). Interior pixels use the full
// window's tap list; border pixels list their valid taps. Then the channel
// loop runs (SIMD or scalar).
template <typename T, typename O>
void forward_cl(const at::Tensor& in, at::Tensor& out, at::Tensor& off, const Geom& g,
                cpu::Isa isa) {
  const T* x = in.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  O* o = static_cast<O*>(off.data_ptr());
  const int64_t C = g.C;
  const bool simd = std::is_same_v<T, float> && isa != cpu::Isa::Scalar;
  auto pixel = isa == cpu::Isa::Avx512 ? &cpu::max_pool2d_pixel_avx512 : &cpu::max_pool2d_pixel_avx2;
  const Interior inner = interior(g);
  std::vector<int64_t> full_tap(g.taps());
  std::vector<int32_t> full_o(g.taps());
  for (int64_t t = 0; t < g.taps(); ++t) {
    full_tap[t] = ((t / g.kW) * g.dH * g.W + (t % g.kW) * g.dW) * C;
    full_o[t] = static_cast<int32_t>(t);
  }
  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> tap(g.taps());
    std::vector<int32_t> tap_o(g.taps());
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / g.OH, oh = item % g.OH;
      const int64_t h0 = oh * g.sH - g.pH, kh0 = first_k(h0, g.dH);
      const T* xn = x + n * g.H * g.W * C;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t w0 = ow * g.sW - g.pW, kw0 = first_k(w0, g.dW);
        const T* base = xn;
        const int64_t* tp = tap.data();
        const int32_t* to = tap_o.data();
        int64_t nt = 0;
        if (inner.has(oh, ow)) {
          base = xn + (h0 * g.W + w0) * C;
          tp = full_tap.data();
          to = full_o.data();
          nt = g.taps();
        } else {
          for (int64_t kh = kh0; kh < g.kH; ++kh) {
            const int64_t ih = h0 + kh * g.dH;
            if (ih >= g.H) break;
            for (int64_t kw = kw0; kw < g.kW; ++kw) {
              const int64_t iw = w0 + kw * g.dW;
              if (iw >= g.W) break;
              tap[nt] = (ih * g.W + iw) * C;
              tap_o[nt++] = static_cast<int32_t>(kh * g.kW + kw);
            }
          }
        }
        const int32_t init = static_cast<int32_t>(kh0 * g.kW + kw0);
        const int64_t pix = (item * g.OW + ow) * C;
        if constexpr (std::is_same_v<T, float>) {
          if (simd) {
            PoolPixelArgs a{base, C, tp, to, nt, init, y + pix, o + pix, g.off32()};
            pixel(a);
            continue;
          }
        }
        forward_pixel_scalar<T, O>(base, C, tp, to, nt, init, y + pix, o + pix);
      }
    }
  });
}

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 4, "fastlayers.", op, ": expected a 4-D (N, C, H, W) input, got ",
              input.dim(), "-D input of shape ", input.sizes());
  check_float_dtype(input, op, "input");
  TORCH_CHECK(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, "fastlayers.", op,
              ": Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
              "but got:", input.sizes());
}

// The common 2x2 / stride 2 window without padding or dilation, whole
// windows only (floor mode or even sizes): windows do not overlap, so every
// input element is written exactly once, by a select on its window's offset
// (no zero pass, no scatter; the loop vectorises). Rows/columns no window
// covers (odd H or W) get zeros.
bool is_k2s2(const Geom& g) {
  return g.kH == 2 && g.kW == 2 && g.sH == 2 && g.sW == 2 && g.pH == 0 && g.pW == 0 &&
         g.dH == 1 && g.dW == 1 && 2 * g.OH <= g.H && 2 * g.OW <= g.W;
}

// Forward of that window, NCHW float, rows of 8+ outputs (AVX2 kernel); an
// undefined `off` computes the values only.
void forward_k2s2_nchw(const at::Tensor& in, at::Tensor& out, at::Tensor& off, const Geom& g) {
  const float* x = in.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  uint8_t* o = off.defined() ? static_cast<uint8_t*>(off.mutable_data_ptr()) : nullptr;
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl)
      for (int64_t oh = 0; oh < OH; ++oh) {
        const float* r0 = x + pl * H * W + 2 * oh * W;
        const int64_t i = (pl * OH + oh) * OW;
        if (o) cpu::max_pool2d_fwd_k2s2_row_avx2(r0, r0 + W, OW, y + i, o + i);
        else cpu::max_pool2d_fwd_k2s2_row_max_avx2(r0, r0 + W, OW, y + i);
      }
  });
}

// 3-wide window, column stride 2, no column dilation (ResNet's stem pool
// k3 s2 p1 and the like), any kH / sH / dH, uint8 offsets: read the input
// rows directly (no band copy), rows outside the input are skipped.
bool is_k3s2(const Geom& g) {
  return g.kW == 3 && g.sW == 2 && g.dW == 1 && !g.off32() && g.OW >= 8;
}


// An undefined `off` computes the values only.
void forward_k3s2_nchw(const at::Tensor& in, at::Tensor& out, at::Tensor& off, const Geom& g) {
  const float* x = in.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  uint8_t* o = off.defined() ? static_cast<uint8_t*>(off.mutable_data_ptr()) : nullptr;
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW, P = OH * OW;
  const bool nt = out.numel() * 5 >= kStreamBytes;
  const int64_t pfd = 4;  // output rows of prefetch distance (2..56 measured alike)
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
    // Horizontal results of up to kH input rows (slot: ih % kH with
    // dilation 1, where a window's rows get distinct slots, else its window
    // row k), tagged with their input row: a row shared by consecutive
    // windows is reduced once.
    const int64_t OWs = (OW + 7) / 8 * 8;  // slots per row (max_pool2d_avx2.cpp)
    std::vector<float> hm_buf(g.kH * OWs);
    std::vector<int32_t> hi_buf(o ? g.kH * OWs : 0);
    std::vector<int64_t> tag(g.kH);
    std::vector<const float*> hm(g.kH);
    std::vector<const int32_t*> hi(g.kH);
    std::vector<int32_t> kh(g.kH);
    std::vector<float> ybuf(nt ? P : 0);
    std::vector<uint8_t> obuf(nt && o ? P : 0);
    for (int64_t pl = b; pl < e; ++pl) {
      float* yp = nt ? ybuf.data() : y + pl * P;
      uint8_t* op = !o ? nullptr : nt ? obuf.data() : o + pl * P;
      std::fill(tag.begin(), tag.end(), -1);
      for (int64_t oh = 0; oh < OH; ++oh) {
        int64_t n = 0;
        for (int64_t k = 0; k < g.kH; ++k) {
          const int64_t ih = oh * g.sH - g.pH + k * g.dH;
          if (ih < 0 || ih >= H) continue;
          const int64_t slot = g.dH == 1 ? ih % g.kH : k;
          float* hms = hm_buf.data() + slot * OWs;
          int32_t* his = o ? hi_buf.data() + slot * OWs : nullptr;
          if (tag[slot] != ih) {
            const float* row = x + (pl * H + ih) * W;
            if (o) cpu::max_pool2d_k3s2_hrow_avx2(row, W, g.pW, OW, hms, his);
            else cpu::max_pool2d_k3s2_hrow_max_avx2(row, W, g.pW, OW, hms);
            tag[slot] = ih;
          }
          hm[n] = hms;
          hi[n] = his;
          kh[n++] = static_cast<int32_t>(k);
        }
        float* yr = yp + oh * OW;
        uint8_t* orow = op ? op + oh * OW : nullptr;
        if (n == 0) {  // window rows all outside the input (dilation): torch's -inf, offset
          const int32_t t = static_cast<int32_t>(first_k(oh * g.sH - g.pH, g.dH) * g.kW);
          for (int64_t ow = 0; ow < OW; ++ow) {
            yr[ow] = -std::numeric_limits<float>::infinity();
            if (orow) orow[ow] = static_cast<uint8_t>(t + first_k(ow * g.sW - g.pW, g.dW));
          }
          continue;
        }
        {
          // Software prefetch of the input rows that first enter a window
          // pfd output rows later (possibly in the next plane, which
          // follows in memory): the row-by-row walk over 4-8 KiB planes is
          // too short for the hardware prefetcher, and the loads stalled.
          const int64_t ih_hi = (oh + pfd) * g.sH - g.pH + (g.kH - 1) * g.dH;
          const int64_t row1 = std::min(pl * H + ih_hi + 1, e * H);
          const int64_t row0 = std::min(pl * H + std::max<int64_t>(ih_hi - g.sH + 1, 0), row1);
          const char* p0 = reinterpret_cast<const char*>(x + row0 * W);
          const char* p1 = reinterpret_cast<const char*>(x + row1 * W);
          for (const char* q = p0; q < p1; q += 64) _mm_prefetch(q, _MM_HINT_T0);
        }
        if (o) cpu::max_pool2d_k3s2_vmerge_avx2(hm.data(), hi.data(), kh.data(), n, OW, yr, orow);
        else cpu::max_pool2d_k3s2_vmerge_max_avx2(hm.data(), n, OW, yr);
      }
      if (nt) {
        cpu::stream_copy_avx2(y + pl * P, yp, P * 4);
        if (o) cpu::stream_copy_avx2(o + pl * P, op, P);
      }
    }
    if (nt) _mm_sfence();
  });
}

// Checks and output geometry shared by both forwards.
Geom forward_geom(const at::Tensor& input_, at::IntArrayRef k, at::IntArrayRef s,
                  at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode) {
  const char* op = "max_pool2d";
  check_input(input_, op);
  check_params(k, s, p, d, op);
  Geom g = make_geom(input_.sizes(), k, s, p, d);
  g.OH = out_size(g.H, g.kH, g.pH, g.sH, g.dH, ceil_mode);
  g.OW = out_size(g.W, g.kW, g.pW, g.sW, g.dW, ceil_mode);
  TORCH_CHECK(g.OH >= 1 && g.OW >= 1, "fastlayers.", op, ": Given input size: (", g.C, "x", g.H,
              "x", g.W, "). Calculated output size: (", g.C, "x", g.OH, "x", g.OW,
              "). Output size is too small");
  return g;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward(const at::Tensor& input_,
                                                      at::IntArrayRef k, at::IntArrayRef s,
                                                      at::IntArrayRef p, at::IntArrayRef d,
                                                      bool ceil_mode) {
  if (is_reduced(input_)) {  // in float32 (common.h); maxima are exact in any precision
    auto [y, off] = fastlayers::max_pool2d_forward(widen(input_), k, s, p, d, ceil_mode);
    return {round_to(y, input_.scalar_type()), off};
  }
  const Geom g = forward_geom(input_, k, s, p, d, ceil_mode);
  const auto fmt = input_.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor input = input_.contiguous(fmt);
  auto opts = input.options().memory_format(fmt);
  at::Tensor out = cpu::empty({g.N, g.C, g.OH, g.OW}, opts);
  at::Tensor off = cpu::empty({g.N, g.C, g.OH, g.OW}, opts.dtype(g.off32() ? at::kInt : at::kByte));
  if (out.numel() == 0) return {out, off};

  const cpu::Isa isa = cpu::active_isa();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastlayers_max_pool2d", [&] {
    auto run = [&](auto o_tag) {
      using O = decltype(o_tag);
      if (cl) forward_cl<scalar_t, O>(input, out, off, g, isa);
      else if (std::is_same_v<scalar_t, float> && isa != cpu::Isa::Scalar && is_k2s2(g) &&
               g.OW >= 8)
        forward_k2s2_nchw(input, out, off, g);
      else if (std::is_same_v<scalar_t, float> && isa != cpu::Isa::Scalar && is_k3s2(g))
        forward_k3s2_nchw(input, out, off, g);
      else if (std::is_same_v<scalar_t, float> && isa != cpu::Isa::Scalar)
        forward_nchw_simd(input, out, off, g, isa);
      else forward_nchw_scalar<scalar_t, O>(input, out, off, g);
    };
    if (g.off32()) run(int32_t{});
    else run(uint8_t{});
  });
  return {out, off};
}

// The output alone, for calls autograd does not record (inference): the
// k2s2 / k3s2 NCHW float kernels then skip the offsets (their compare and
// blend chains are most of the forward's work); the other paths compute
// them and drop them.
at::Tensor max_pool2d(const at::Tensor& input_, at::IntArrayRef k, at::IntArrayRef s,
                      at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode) {
  if (is_reduced(input_))
    return round_to(fastlayers::max_pool2d(widen(input_), k, s, p, d, ceil_mode), input_.scalar_type());
  const Geom g = forward_geom(input_, k, s, p, d, ceil_mode);
  const bool fast = input_.scalar_type() == at::kFloat &&
                    cpu::active_isa() != cpu::Isa::Scalar &&
                    input_.suggest_memory_format() == at::MemoryFormat::Contiguous &&
                    ((is_k2s2(g) && g.OW >= 8) || is_k3s2(g));
  if (!fast) return std::get<0>(max_pool2d_forward(input_, k, s, p, d, ceil_mode));
  const at::Tensor input = input_.contiguous();
  at::Tensor out = cpu::empty({g.N, g.C, g.OH, g.OW}, input.options());
  if (out.numel() == 0) return out;
  at::Tensor none;
  if (is_k2s2(g)) forward_k2s2_nchw(input, out, none, g);
  else forward_k3s2_nchw(input, out, none, g);
  return out;
}

// ---- backward -------------------------------------------------------------

void check_offsets(const at::Tensor& off, const Geom& g, const char* op) {
  const auto want = g.off32() ? at::kInt : at::kByte;
  TORCH_CHECK(off.scalar_type() == want, "fastlayers.", op, ": offsets must have dtype ", want,
              " for a ", g.kH, "x", g.kW, " window, got ", off.scalar_type());
  TORCH_CHECK(off.dim() == 4, "fastlayers.", op, ": offsets must be 4-D, got ", off.sizes());
}

// x[j * xs + rel[o[j]] * rs] += y[j] for j in [lo, hi); offsets >= nt are
// skipped. Plain arguments so nothing is reloaded after each store.
template <typename T, typename O>
inline void scatter_row(T* __restrict x, const T* __restrict y, const O* __restrict o,
                        int64_t lo, int64_t hi, int64_t xs, int64_t rs,
                        const int64_t* __restrict rel, uint64_t nt) {
  for (int64_t j = lo; j < hi; ++j) {
    const uint64_t t = static_cast<uint64_t>(o[j]);
    if (t < nt) x[j * xs + rel[t] * rs] += y[j];
  }
}

template <typename T>
void backward_k2s2_nchw(const T* dy, const uint8_t* of, T* dx, const Geom& g) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const bool simd = cpu::active_isa() != cpu::Isa::Scalar;
  const int64_t H = g.H, W = g.W, OH = g.OH, OW = g.OW;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
    for (int64_t pl = b; pl < e; ++pl) {
      T* x = dx + pl * H * W;
      const T* y = dy + pl * OH * OW;
      const uint8_t* o = of + pl * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh, y += OW, o += OW) {
        T* x0 = x + 2 * oh * W;
        T* x1 = x0 + W;
        if constexpr (std::is_same_v<T, float>) {
          if (simd) {
            cpu::max_pool2d_bwd_k2s2_row_avx2(y, o, OW, x0, x1);
            for (int64_t iw = 2 * OW; iw < W; ++iw) x0[iw] = x1[iw] = T(0);
            continue;
          }
        }
        for (int64_t ow = 0; ow < OW; ++ow) {
          // Branch-free selects on the bits (the argmax is random: branches
          // would mispredict a quarter of the time).
          U v;
          std::memcpy(&v, y + ow, sizeof v);
          const U t = o[ow];
          const U b0 = v & (U(0) - U(t == 0)), b1 = v & (U(0) - U(t == 1));
          const U b2 = v & (U(0) - U(t == 2)), b3 = v & (U(0) - U(t == 3));
          std::memcpy(x0 + 2 * ow, &b0, sizeof b0);
          std::memcpy(x0 + 2 * ow + 1, &b1, sizeof b1);
          std::memcpy(x1 + 2 * ow, &b2, sizeof b2);
          std::memcpy(x1 + 2 * ow + 1, &b3, sizeof b3);
        }
        for (int64_t iw = 2 * OW; iw < W; ++iw) x0[iw] = x1[iw] = T(0);
      }
      std::fill(x + 2 * OH * W, x + H * W, T(0));
    }
  });
}

template <typename T, typename O>
void backward_impl(const at::Tensor& go, const at::Tensor& off, at::Tensor& gi, const Geom& g,
                   bool cl) {
  if constexpr (std::is_same_v<O, uint8_t>) {
    if (!cl && is_k2s2(g)) {
      backward_k2s2_nchw(go.const_data_ptr<T>(), static_cast<const uint8_t*>(off.const_data_ptr()),
                         gi.mutable_data_ptr<T>(), g);
      return;
    }
  }
  const T* dy = go.const_data_ptr<T>();
  const O* of = static_cast<const O*>(off.const_data_ptr());
  T* dx = gi.mutable_data_ptr<T>();
  const int64_t ntaps = g.taps();
  std::vector<int64_t> dh(ntaps), dw(ntaps), rel(ntaps);  // offset -> (kh dH, kw dW), flat
  for (int64_t t = 0; t < ntaps; ++t) {
    dh[t] = (t / g.kW) * g.dH;
    dw[t] = (t % g.kW) * g.dW;
    rel[t] = dh[t] * g.W + dw[t];
  }
  const Interior in = interior(g);
  // Flat input position for offset t of output (oh, ow), or -1 when it is not
  // inside the input (empty windows, or garbage offsets: never written).
  auto target = [&](int64_t oh, int64_t ow, int64_t t) -> int64_t {
    if (t < 0 || t >= ntaps) return -1;
    const int64_t ih = oh * g.sH - g.pH + dh[t], iw = ow * g.sW - g.pW + dw[t];
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return -1;
    return ih * g.W + iw;
  };
  auto origin = [&](int64_t oh, int64_t ow) {
    return (oh * g.sH - g.pH) * g.W + (ow * g.sW - g.pW);
  };
  if (!cl) {
    const int64_t HW = g.H * g.W, OH = g.OH, OW = g.OW, sW = g.sW;
    const uint64_t nt = static_cast<uint64_t>(ntaps);
    const int64_t* relp = rel.data();
    // Big gradients: each plane is built in a thread-local buffer (in cache)
    // and streamed out, so dx is written once without being read first.
    const bool stream = cpu::active_isa() != cpu::Isa::Scalar &&
                        static_cast<int64_t>(gi.nbytes()) >= kStreamBytes &&
                        HW * static_cast<int64_t>(sizeof(T)) <= kStreamPlaneBytes;
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
      std::vector<T> plane(stream ? HW : 0);
      for (int64_t pl = b; pl < e; ++pl) {
        T* x = stream ? plane.data() : dx + pl * HW;
        std::fill(x, x + HW, T(0));
        const T* y = dy + pl * OH * OW;
        const O* o = of + pl * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh, y += OW, o += OW) {
          const bool row_in = oh >= in.oh0 && oh < in.oh1;
          const int64_t w_lo = row_in ? in.ow0 : OW, w_hi = row_in ? in.ow1 : OW;
          auto slow = [&](int64_t ow) {
            const int64_t tgt = target(oh, ow, o[ow]);
            if (tgt >= 0) x[tgt] += y[ow];
          };
          for (int64_t ow = 0; ow < w_lo; ++ow) slow(ow);
          scatter_row(x + origin(oh, 0), y, o, w_lo, w_hi, sW, 1, relp, nt);
          for (int64_t ow = w_hi; ow < OW; ++ow) slow(ow);
        }
        if (stream) cpu::stream_copy_avx2(dx + pl * HW, x, HW * sizeof(T));
      }
      if (stream) _mm_sfence();
    });
    return;
  }
  // Channels-last: items are (n, block of channels).
  const int64_t C = g.C;
  const uint64_t nt = static_cast<uint64_t>(ntaps);
  const int64_t* relp = rel.data();
  int64_t cb = C;
  const int64_t want = 4 * at::get_num_threads();
  if (g.N < want) cb = std::max<int64_t>(16, (C * g.N + want - 1) / want);
  const int64_t nblk = (C + cb - 1) / cb;
  at::parallel_for(0, g.N * nblk, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / nblk, c0 = (item % nblk) * cb, c1 = std::min(C, c0 + cb);
      T* x = dx + n * g.H * g.W * C;
      if (c1 - c0 == C) std::fill(x, x + g.H * g.W * C, T(0));
      else
        for (int64_t px = 0; px < g.H * g.W; ++px) std::fill(x + px * C + c0, x + px * C + c1, T(0));
      for (int64_t oh = 0; oh < g.OH; ++oh)
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t base = ((n * g.OH + oh) * g.OW + ow) * C;
          const O* o = of + base;
          const T* y = dy + base;
          if (in.has(oh, ow)) {
            scatter_row(x + origin(oh, ow) * C, y, o, c0, c1, 1, C, relp, nt);
          } else {
            for (int64_t c = c0; c < c1; ++c) {
              const int64_t tgt = target(oh, ow, o[c]);
              if (tgt >= 0) x[tgt * C + c] += y[c];
            }
          }
        }
    }
  });
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& offsets,
                               at::IntArrayRef input_size, at::IntArrayRef k, at::IntArrayRef s,
                               at::IntArrayRef p, at::IntArrayRef d, bool channels_last) {
  const char* op = "max_pool2d_backward";
  if (is_reduced(grad_output))
    return round_to(fastlayers::max_pool2d_backward(widen(grad_output), offsets, input_size, k, s, p, d,
                                        channels_last),
                    grad_output.scalar_type());
  check_params(k, s, p, d, op);
  TORCH_CHECK(input_size.size() == 4, "fastlayers.", op, ": input_size must have 4 elements");
  check_float_dtype(grad_output, op, "grad_output");
  Geom g = make_geom(input_size, k, s, p, d);
  check_offsets(offsets, g, op);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.sizes() == offsets.sizes() &&
                  grad_output.size(0) == g.N && grad_output.size(1) == g.C,
              "fastlayers.", op, ": grad_output ", grad_output.sizes(), " and offsets ",
              offsets.sizes(), " must have the same shape [", g.N, ", ", g.C, ", OH, OW]");
  TORCH_CHECK(g.N >= 0 && g.C >= 0 && g.H >= 0 && g.W >= 0, "fastlayers.", op,
              ": bad input_size ", input_size);
  g.OH = grad_output.size(2);
  g.OW = grad_output.size(3);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor go = grad_output.contiguous(fmt), off = offsets.contiguous(fmt);
  at::Tensor gi = cpu::empty({g.N, g.C, g.H, g.W}, grad_output.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "fastlayers_max_pool2d_backward", [&] {
    if (g.off32()) backward_impl<scalar_t, int32_t>(go, off, gi, g, channels_last);
    else backward_impl<scalar_t, uint8_t>(go, off, gi, g, channels_last);
  });
  return gi;
}

// ---- offsets -> torch's int64 indices -------------------------------------

template <typename O>
void indices_impl(const at::Tensor& off, at::Tensor& idx, const Geom& g, bool cl) {
  const O* o = static_cast<const O*>(off.const_data_ptr());
  int64_t* r = idx.mutable_data_ptr<int64_t>();
  const int64_t total = off.numel();
  at::parallel_for(0, total, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t pix = cl ? i / g.C : i;  // position in [.., OH, OW] order
      const int64_t ow = pix % g.OW, oh = (pix / g.OW) % g.OH;
      const int64_t t = o[i];
      const int64_t ih = oh * g.sH - g.pH + (t / g.kW) * g.dH;
      const int64_t iw = ow * g.sW - g.pW + (t % g.kW) * g.dW;
      r[i] = ih * g.W + iw;
    }
  });
}

at::Tensor max_pool2d_indices(const at::Tensor& offsets, int64_t input_width, at::IntArrayRef k,
                              at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d) {
  const char* op = "max_pool2d_indices";
  check_params(k, s, p, d, op);
  TORCH_CHECK(input_width > 0, "fastlayers.", op, ": input_width must be positive, got ",
              input_width);
  Geom g = make_geom({0, 0, 0, input_width}, k, s, p, d);
  check_offsets(offsets, g, op);
  g.N = offsets.size(0); g.C = offsets.size(1); g.OH = offsets.size(2); g.OW = offsets.size(3);
  const auto fmt = offsets.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  at::Tensor off = offsets.contiguous(fmt);
  at::Tensor idx = cpu::empty(off.sizes(), off.options().dtype(at::kLong).memory_format(fmt));
  if (idx.numel() == 0) return idx;
  if (g.off32()) indices_impl<int32_t>(off, idx, g, cl);
  else indices_impl<uint8_t>(off, idx, g, cl);
  return idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("max_pool2d_forward", &max_pool2d_forward);
  m.impl("max_pool2d", &max_pool2d);
  m.impl("max_pool2d_backward", &max_pool2d_backward);
  m.impl("max_pool2d_indices", &max_pool2d_indices);
}

}  // namespace fastlayers
