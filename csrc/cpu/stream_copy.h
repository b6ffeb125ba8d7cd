// Streaming (non-temporal) stores for outputs much larger than the caches:
// a kernel computes a plane into a small buffer in L1/L2, then streams it
// out, so the output's cache lines are not read from memory before being
// overwritten (a plain store reads each line first: 3 bytes of traffic per
// 2 copied instead of 2). MaxPool2d streams through stream_copy_avx2;
// BatchNorm streams from its own kernels, with the same size threshold.
// (Tried on the depthwise Conv2d forward, 32x32x56x56: no measurable gain;
// that kernel is bound by each core's reads, 1 thread 5.7-6.2 ms, 2 threads
// 2.7-2.9 ms.)
#pragma once
#include <cstdint>

namespace fastlayers::cpu {

// Outputs at least this big are streamed.
constexpr int64_t kStreamBytes = int64_t(4) << 20;
// Planes (the unit computed into a buffer, then streamed) up to this size.
constexpr int64_t kStreamPlaneBytes = int64_t(1) << 20;

// dst[0, n) = src[0, n) with non-temporal stores for the whole 64-byte lines
// of dst (plain stores for the head and tail). AVX2 (callers check the
// active ISA); the caller issues _mm_sfence before another thread reads dst.
void stream_copy_avx2(void* dst, const void* src, int64_t n);

}  // namespace fastlayers::cpu
