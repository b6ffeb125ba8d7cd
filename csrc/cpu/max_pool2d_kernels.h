// SIMD MaxPool2d forward kernels (float32), shared by the per-ISA files
// max_pool2d_avx2.cpp and max_pool2d_avx512.cpp.
//
// The argument structs and entry points are declared here; the template
// algorithm is in max_pool2d_simd.h, included by the ISA files after their
// `#pragma GCC target`. It is written against vector traits `Vt`:
//   Vt::W            lanes
//   Vt::V / Vt::I    float / int32 vector
//   load, load_n (first n lanes), load_s2 (every 2nd float), load_s2_pair
//   (even and odd floats), gather (lane j at
//   q[j * s]), set1, seti, loadi, addi, lane_mul,
//   upd(v, m)        mask of lanes where (v > m) || isnan(v)  (torch's rule)
//   blend, blendi    take the second argument where the mask is set
//   store, store_u8, store_i32
#pragma once
#include <cstdint>

namespace fastlayers::cpu {

// NCHW: rows of one plane from a band buffer padded with -inf, so every window
// is read without bounds checks. Padding never wins: -inf is never "> max"
// and the running max starts at -inf with the offset of the first in-input
// window position (torch's rule; it also gives all -inf windows that offset).
struct PoolRowsArgs {
  const float* buf;      // buffer row r holds padded input row (r0 * sH + r)
  int64_t ldb;           // buffer row stride; column q holds input column q - pW
  int64_t nrows;         // output rows to compute
  int64_t OW, kH, kW, sH, sW, dH, dW;
  const int32_t* kh0;    // per output row: kh0 * kW, kh0 = first kh inside the input
  const int32_t* kw0;    // per output column, padded to a multiple of 16 entries
  float* out;            // output row r at out + r * ldo
  int64_t ldo;
  void* off;             // offsets (uint8 or int32), row r at off + r * ldo
  bool off32;
};

// Channels-last: one output pixel, all channels (SIMD across channels).
struct PoolPixelArgs {
  const float* in;       // input pixel of the window origin (may be padding)
  int64_t C;
  const int64_t* tap;    // element offsets from `in` of the valid window taps
  const int32_t* tap_o;  // their window offsets kh * kW + kw
  int64_t ntaps;
  int32_t init;          // offset of the first in-input window position
  float* out;
  void* off;
  bool off32;
};

void max_pool2d_rows_avx2(const PoolRowsArgs& a);
// Backward of the non-overlapping 2x2 / stride 2 window (AVX2; also used on
// AVX-512 CPUs): one output row into input rows x0 and x1, every input written.
void max_pool2d_fwd_k2s2_row_avx2(const float* r0, const float* r1, int64_t OW, float* out,
                                  uint8_t* off);  // needs OW >= 8
void max_pool2d_bwd_k2s2_row_avx2(const float* dy, const uint8_t* o, int64_t OW, float* x0,
                                  float* x1);
// Forward of a 3-wide, column-stride-2 window (dilation 1), OW >= 8, uint8
// offsets (AVX2; also used on AVX-512 CPUs), in two passes: hrow reduces one
// input row over each output column's 3 taps (max, kw), once per input row;
// vmerge merges the nrows rows inside a window (hm[i], hi[i] of window row
// kh[i], in order) into an output row and its offsets. hm and hi hold a
// row's results in ceil(OW / 8) * 8 slots, in a lane order of their own.
void max_pool2d_k3s2_hrow_avx2(const float* row, int64_t W, int64_t pW, int64_t OW, float* hm,
                               int32_t* hi);
void max_pool2d_k3s2_vmerge_avx2(const float* const* hm, const int32_t* const* hi,
                                 const int32_t* kh, int64_t nrows, int64_t OW, float* out,
                                 uint8_t* off);
// Value-only variants of the k2s2 / k3s2 kernels (no offsets: the forward
// of a call autograd does not record), same max rule.
void max_pool2d_fwd_k2s2_row_max_avx2(const float* r0, const float* r1, int64_t OW, float* out);
void max_pool2d_k3s2_hrow_max_avx2(const float* row, int64_t W, int64_t pW, int64_t OW,
                                   float* hm);
void max_pool2d_k3s2_vmerge_max_avx2(const float* const* hm, int64_t nrows, int64_t OW,
                                     float* out);
void max_pool2d_pixel_avx2(const PoolPixelArgs& a);
void max_pool2d_rows_avx512(const PoolRowsArgs& a);
void max_pool2d_pixel_avx512(const PoolPixelArgs& a);

}  // namespace fastlayers::cpu
