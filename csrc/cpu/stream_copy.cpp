// Non-temporal copy for large outputs (AVX2; also used on AVX-512 CPUs). See stream_copy.h.
#include "stream_copy.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastlayers::cpu {

// dst[0, n) = src[0, n) with non-temporal stores for the whole 64-byte
// lines of dst (plain stores for the head and tail); the caller fences.
void stream_copy_avx2(void* dst, const void* src, int64_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  int64_t i = head;
  for (; i + 64 <= n; i += 64) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32)));
  }
  std::memcpy(d + i, s + i, n - i);
}

}  // namespace fastlayers::cpu

#pragma GCC pop_options
