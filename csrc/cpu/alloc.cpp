// See alloc.h.
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastlayers::cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kPage = 4096;
constexpr size_t kCached = size_t(64) << 10;  // smaller blocks: torch's allocator

bool thp_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTLAYERS_THP");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

// Freed blocks of 64 KiB and more are kept for reuse, up to a byte limit: a
// training loop allocates the same shapes every step, and a fresh block costs
// page faults and the kernel zeroing it (glibc only keeps some of them: its
// mmap threshold and heap trimming hand most back to the kernel). FASTLAYERS_CACHE_MB sets the limit (default 256; 0 turns
// caching off); fastlayers.empty_cache() frees the cached blocks.
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* c = new BlockCache();  // never destroyed (used at exit)
    return *c;
  }
  void* take(size_t n) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = free_.find(n);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_ -= n;
    return p;
  }
  // Keeps the block if it fits under the limit, else frees it.
  void give(void* p, size_t n) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cached_ + n <= limit_) {
        free_.emplace(n, p);
        cached_ += n;
        return;
      }
    }
    std::free(p);
  }
  size_t empty() {
    std::lock_guard<std::mutex> g(mu_);
    const size_t n = cached_;
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
    return n;
  }
  size_t cached() {
    std::lock_guard<std::mutex> g(mu_);
    return cached_;
  }

 private:
  BlockCache() {
    const char* e = std::getenv("FASTLAYERS_CACHE_MB");
    limit_ = size_t(e ? std::max(0L, std::atol(e)) : 256) << 20;
  }
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, limit_ = 0;
};

struct Block {
  void* p;
  size_t n;
};

void release(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  BlockCache::get().give(b->p, b->n);
  delete b;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kCached) return c10::GetCPUAllocator()->allocate(n);
    const bool huge = n >= kHuge && thp_enabled();
    const size_t unit = huge ? kHuge : kPage;
    const size_t sz = (n + unit - 1) / unit * unit;  // whole (huge) pages
    void* p = BlockCache::get().take(sz);
    if (p == nullptr) {
      if (posix_memalign(&p, unit, sz) != 0 || p == nullptr) {
        BlockCache::get().empty();  // retry once without the cache's blocks
        if (posix_memalign(&p, unit, sz) != 0 || p == nullptr) throw std::bad_alloc();
      }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (huge) madvise(p, sz, MADV_HUGEPAGE);  // advice only: failure means 4 KiB pages
#endif
    }
    return {p, new Block{p, sz}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator* allocator() {
  static HugePageAllocator a;
  return &a;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu());
  return at::detail::empty_generic(sizes, allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()),
                                   opts.memory_format_opt());
}

at::Tensor empty_like(const at::Tensor& t, at::MemoryFormat fmt) {
  return empty(t.sizes(), t.options().memory_format(fmt));
}

int64_t empty_cache() { return static_cast<int64_t>(BlockCache::get().empty()); }
int64_t cached_bytes() { return static_cast<int64_t>(BlockCache::get().cached()); }

}  // namespace fastlayers::cpu
