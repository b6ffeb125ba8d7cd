// See alloc.h.
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <list>
#include <mutex>
#include <new>
#include <vector>

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

// Blocks of 64 KiB and more are mapped straight from the kernel (Linux) and
// unmapped when freed, not taken from glibc's heap: 2 MiB-aligned blocks in
// the heap, interleaved with torch's own allocations, left holes that neither
// could reuse, and a ResNet-18 training step's peak RSS grew by a third
// (82 MiB against 50 with the blocks outside the heap, torch 55).
void* map_block(size_t sz, bool huge) {
#if defined(__linux__)
  const size_t len = huge ? sz + kHuge : sz;  // room to align to 2 MiB
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  if (!huge) return m;
  const uintptr_t a = reinterpret_cast<uintptr_t>(m);
  const uintptr_t al = (a + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
  if (al > a) munmap(m, al - a);
  if (a + len > al + sz) munmap(reinterpret_cast<void*>(al + sz), a + len - (al + sz));
  void* p = reinterpret_cast<void*>(al);
#if defined(MADV_HUGEPAGE)
  madvise(p, sz, MADV_HUGEPAGE);  // advice only: failure means 4 KiB pages
#endif
  return p;
#else
  void* p = nullptr;
  if (posix_memalign(&p, huge ? kHuge : kPage, sz) != 0) return nullptr;
  return p;
#endif
}

void unmap_block(void* p, size_t sz) {
#if defined(__linux__)
  munmap(p, sz);
#else
  (void)sz;
  std::free(p);
#endif
}

// Freed blocks are kept for reuse, exact size, up to a byte limit: a training
// loop allocates the same shapes every step, and a fresh block costs page
// faults and the kernel zeroing it. FASTLAYERS_CACHE_MB sets the limit
// (default 256; 0 turns caching off); fastlayers.empty_cache() frees the
// cached blocks.
//
// The cache never makes the footprint (blocks in use + cached) grow: a
// request it cannot serve first unmaps cached blocks, oldest first, of at
// least the size asked for. The footprint then only grows when the cache is
// empty, that is when it equals the bytes in use, so its peak is the peak of
// the blocks in use, as without a cache.
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* c = new BlockCache();  // never destroyed (used at exit)
    return *c;
  }
  // A cached block of exactly n bytes (the most recently freed), or nullptr
  // after unmapping at least n bytes of other cached blocks (all, if fewer).
  void* take(size_t n) {
    std::vector<Entry> victims;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->n == n) {
          p = it->p;
          free_.erase(std::next(it).base());
          cached_ -= n;
          return p;
        }
      }
      size_t got = 0;
      while (got < n && !free_.empty()) {
        victims.push_back(free_.front());
        got += free_.front().n;
        cached_ -= free_.front().n;
        free_.pop_front();
      }
    }
    for (const Entry& e : victims) unmap_block(e.p, e.n);
    return nullptr;
  }
  // Keeps the block if it fits under the limit, else unmaps it.
  void give(void* p, size_t n) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cached_ + n <= limit_) {
        free_.push_back({p, n});
        cached_ += n;
        return;
      }
    }
    unmap_block(p, n);
  }
  size_t empty() {
    std::list<Entry> all;
    size_t n = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      all.swap(free_);
      n = cached_;
      cached_ = 0;
    }
    for (const Entry& e : all) unmap_block(e.p, e.n);
    return n;
  }
  size_t cached() {
    std::lock_guard<std::mutex> g(mu_);
    return cached_;
  }

 private:
  struct Entry {
    void* p;
    size_t n;
  };
  BlockCache() {
    const char* e = std::getenv("FASTLAYERS_CACHE_MB");
    limit_ = size_t(e ? std::max(0L, std::atol(e)) : 256) << 20;
  }
  std::mutex mu_;
  std::list<Entry> free_;  // oldest first
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

// Whole pages (2 MiB ones when huge), from the cache or freshly mapped.
size_t block_size(size_t n, bool huge) {
  const size_t unit = huge ? kHuge : kPage;
  return (n + unit - 1) / unit * unit;
}

bool is_huge(size_t n) { return n >= kHuge && thp_enabled(); }

void* take_block(size_t sz, bool huge) {
  void* p = BlockCache::get().take(sz);
  if (p == nullptr) {
    p = map_block(sz, huge);
    if (p == nullptr) {
      BlockCache::get().empty();  // retry once without the cache's blocks
      p = map_block(sz, huge);
      if (p == nullptr) throw std::bad_alloc();
    }
  }
  return p;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kCached) return c10::GetCPUAllocator()->allocate(n);
    const bool huge = is_huge(n);
    const size_t sz = block_size(n, huge);
    void* p = take_block(sz, huge);
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

void* workspace_alloc(size_t n) {
  if (n < kCached) {
    void* p = std::aligned_alloc(64, std::max<size_t>(64, (n + 63) / 64 * 64));
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  const bool huge = is_huge(n);
  return take_block(block_size(n, huge), huge);
}

void workspace_free(void* p, size_t n) {
  if (p == nullptr) return;
  if (n < kCached) {
    std::free(p);
    return;
  }
  BlockCache::get().give(p, block_size(n, is_huge(n)));
}

int64_t empty_cache() { return static_cast<int64_t>(BlockCache::get().empty()); }
int64_t cached_bytes() { return static_cast<int64_t>(BlockCache::get().cached()); }

}  // namespace fastlayers::cpu
