// Shared pieces of the CPU Conv2d family (conv2d.cpp, conv2d_direct.cpp,
// im2col.h): the problem shape and the work-splitting helper.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastlayers::cpu {

// One Conv2d problem. Input [N, C, H, W], weight [K, Cg, R, S], output
// [N, K, P, Q]; G groups of Cg = C / G input and Kg = K / G output channels.
struct ConvShape {
  int64_t N, C, H, W;
  int64_t K, R, S;
  int64_t P, Q;
  int64_t sH, sW, pH, pW, dH, dW;
  int64_t G, Cg, Kg;
  int64_t HW() const { return H * W; }
  int64_t PQ() const { return P * Q; }
  int64_t RS() const { return R * S; }
  int64_t CgRS() const { return Cg * R * S; }
  // 1x1, stride 1, no padding: the input itself is the im2col matrix.
  bool pointwise() const { return R == 1 && S == 1 && sH == 1 && sW == 1 && pH == 0 && pW == 0; }
};

// Output columns ow (0 <= ow < Q) whose input column ow*sW + off lies in
// [0, W): the half-open range [lo, hi) (empty when hi <= lo).
inline void valid_range(int64_t off, int64_t stride, int64_t W, int64_t Q, int64_t& lo,
                        int64_t& hi) {
  // lo = ceil(-off / stride) clamped at 0; hi = floor((W - 1 - off) / stride) + 1.
  lo = off >= 0 ? 0 : (-off + stride - 1) / stride;
  hi = W - 1 - off < 0 ? 0 : (W - 1 - off) / stride + 1;
  lo = std::min(lo, Q);
  hi = std::min(hi, Q);
}

// Splits `items` into contiguous chunks and runs fn(chunk, begin, end) once
// per chunk. With at least as many items as threads the chunks (one per
// thread) run in parallel and the code inside fn runs single-threaded
// (nested parallel_for is inline); otherwise there is one chunk, run on the
// caller, and the code inside fn may parallelise itself. The split depends
// only on `items` and the thread count, so per-chunk partial results summed in
// chunk order are deterministic for a given thread count.
// Returns the number of chunks.
template <typename F>
int64_t run_chunks(int64_t items, const F& fn) {
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (items <= 0) return 0;
  if (nt <= 1 || items < nt) {
    fn(int64_t(0), int64_t(0), items);
    return 1;
  }
  at::parallel_for(0, nt, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, c * items / nt, (c + 1) * items / nt);
  });
  return nt;
}

inline int64_t planned_chunks(int64_t items) {
  const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  return (nt <= 1 || items < nt) ? 1 : nt;
}

// Direct kernels for Cg == 1 (depthwise, channel multipliers, single-channel
// input): every output channel k reads input channel k / Kg only. Pointers are
// dense: NCHW or NHWC as named; weight [K, R, S]; bias may be null.
template <typename T>
void direct_forward_nchw(const ConvShape& s, const T* x, const T* w, const T* b, T* y);
template <typename T>
void direct_forward_nhwc(const ConvShape& s, const T* x, const T* w, const T* b, T* y);
template <typename T>
void direct_grad_input_nchw(const ConvShape& s, const T* dy, const T* w, T* dx);
template <typename T>
void direct_grad_input_nhwc(const ConvShape& s, const T* dy, const T* w, T* dx);
// db (may be null) asks for the bias gradient too; returns whether it was
// written (else the caller computes it).
template <typename T>
bool direct_grad_weight_nchw(const ConvShape& s, const T* dy, const T* x, T* dw, T* db);
template <typename T>
void direct_grad_weight_nhwc(const ConvShape& s, const T* dy, const T* x, T* dw);

// Flat direct kernels for small NCHW float convs with Cg > 1 and stride 1
// (conv2d_small.cpp, AVX2: callers also check active_isa() != Scalar).
// They overwrite y, dx, dw and db (db may be null). small_conv_ok: the shape
// suits them and one image's padded input planes and outputs take at most
// `budget` bytes (their per-thread workspace is about that).
bool small_conv_ok(const ConvShape& s, int64_t budget);
void small_forward_nchw(const ConvShape& s, const float* x, const float* w, const float* b,
                        float* y);
void small_grad_input_nchw(const ConvShape& s, const float* dy, const float* w, float* dx);
void small_grad_weight_nchw(const ConvShape& s, const float* dy, const float* x, float* dw,
                            float* db);

}  // namespace fastlayers::cpu
