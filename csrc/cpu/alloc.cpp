// See alloc.h.
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <list>
#include <unordered_map>
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

// Freed blocks are kept for reuse, up to a byte limit: a training loop
// allocates the same shapes every step, and a fresh block costs page faults
// and the kernel zeroing it. FASTLAYERS_CACHE_MB sets the limit (default 256;
// 0 turns caching off); fastlayers.empty_cache() frees the cached blocks.
//
// A request takes the most recently freed block of exactly its size, else the
// smallest cached block of up to kFit times its size (its pages are resident
// already, so the extra costs no memory that is not held anyway). A request
// the cache cannot serve first unmaps cached blocks, oldest first, of at least
// the size asked for, as long as more than the slack is cached: the footprint
// (blocks in use + cached) then stays within the peak of the blocks in use
// plus the slack, max(16 MiB, a quarter of that peak). Without the slack
// (every miss evicting) a ResNet-18 step peaked at 57 MiB against torch's 55,
// but a step of it mapped ~170 fresh blocks as transient workspaces of
// different sizes kept evicting each other (LeNet-5's forward 1.4 -> 3.6 ms);
// without eviction the cached blocks held 25-50 MiB that torch's own
// allocations could not use.
class BlockCache {
 public:
  static constexpr size_t kFit = 8;
  static constexpr size_t kMinSlack = size_t(16) << 20;

  static BlockCache& get() {
    static BlockCache* c = new BlockCache();  // never destroyed (used at exit)
    return *c;
  }
  // A cached block for n bytes (its size, >= n, in *got), or nullptr, after
  // unmapping cached blocks as above.
  void* take(size_t n, size_t* got) {
    std::vector<Entry> victims;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->n == n) best = it;  // the last (most recent) exact match
      }
      if (best == free_.end()) {
        for (auto it = free_.begin(); it != free_.end(); ++it)
          if (it->n > n && it->n / kFit <= n && (best == free_.end() || it->n < best->n))
            best = it;
      }
      if (best != free_.end()) {
        void* p = best->p;
        *got = best->n;
        cached_ -= best->n;
        free_.erase(best);
        in_use(*got);
        return p;
      }
      const size_t slack = std::max(kMinSlack, peak_in_use_ / 4);
      size_t freed = 0;
      while (freed < n && cached_ > slack && !free_.empty()) {
        victims.push_back(free_.front());
        freed += free_.front().n;
        cached_ -= free_.front().n;
        free_.pop_front();
      }
      *got = n;
      in_use(n);  // the caller maps it (or, failing, calls unused)
    }
    for (const Entry& e : victims) unmap_block(e.p, e.n);
    ++maps_;
    return nullptr;
  }
  // A block taken for a request that then failed.
  void unused(size_t n) {
    std::lock_guard<std::mutex> g(mu_);
    used_ -= n;
  }
  // Keeps the freed block if it fits under the limit, else unmaps it.
  void give(void* p, size_t n) {
    {
      std::lock_guard<std::mutex> g(mu_);
      used_ -= n;
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
  // Fresh blocks mapped so far (cache misses).
  int64_t maps() const { return maps_.load(); }

 private:
  struct Entry {
    void* p;
    size_t n;
  };
  BlockCache() {
    const char* e = std::getenv("FASTLAYERS_CACHE_MB");
    limit_ = size_t(e ? std::max(0L, std::atol(e)) : 256) << 20;
  }
  void in_use(size_t n) {
    used_ += n;
    peak_in_use_ = std::max(peak_in_use_, used_);
  }
  std::mutex mu_;
  std::list<Entry> free_;  // oldest first
  size_t cached_ = 0, limit_ = 0, used_ = 0, peak_in_use_ = 0;
  std::atomic<int64_t> maps_{0};
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

// Whole pages (2 MiB ones when huge).
size_t block_size(size_t n, bool huge) {
  const size_t unit = huge ? kHuge : kPage;
  return (n + unit - 1) / unit * unit;
}

bool is_huge(size_t n) { return n >= kHuge && thp_enabled(); }

// A block of at least sz bytes (its size in *got), cached or freshly mapped.
void* take_block(size_t sz, bool huge, size_t* got) {
  void* p = BlockCache::get().take(sz, got);
  if (p == nullptr) {
    p = map_block(sz, huge);
    if (p == nullptr) {
      BlockCache::get().empty();  // retry once without the cache's blocks
      p = map_block(sz, huge);
      if (p == nullptr) {
        BlockCache::get().unused(sz);
        throw std::bad_alloc();
      }
    }
  }
  return p;
}

// Workspace blocks' sizes (a cached block may be larger than asked for).
std::mutex& ws_mutex() {
  static auto* m = new std::mutex();
  return *m;
}
std::unordered_map<void*, size_t>& ws_sizes() {
  static auto* m = new std::unordered_map<void*, size_t>();
  return *m;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kCached) return c10::GetCPUAllocator()->allocate(n);
    const bool huge = is_huge(n);
    size_t got = 0;
    void* p = take_block(block_size(n, huge), huge, &got);
    return {p, new Block{p, got}, &release, c10::Device(c10::DeviceType::CPU)};
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
  size_t got = 0;
  void* p = take_block(block_size(n, huge), huge, &got);
  std::lock_guard<std::mutex> g(ws_mutex());
  ws_sizes()[p] = got;
  return p;
}

void workspace_free(void* p, size_t n) {
  if (p == nullptr) return;
  if (n < kCached) {
    std::free(p);
    return;
  }
  size_t got = 0;
  {
    std::lock_guard<std::mutex> g(ws_mutex());
    auto it = ws_sizes().find(p);
    got = it->second;
    ws_sizes().erase(it);
  }
  BlockCache::get().give(p, got);
}

int64_t empty_cache() { return static_cast<int64_t>(BlockCache::get().empty()); }
int64_t cached_bytes() { return static_cast<int64_t>(BlockCache::get().cached()); }
int64_t blocks_mapped() { return BlockCache::get().maps(); }

}  // namespace fastlayers::cpu
