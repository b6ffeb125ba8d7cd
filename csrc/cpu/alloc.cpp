// See alloc.h.
#include "alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastlayers::cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

bool thp_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FASTLAYERS_THP");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

void free_huge(void* p) { std::free(p); }

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kHuge || !thp_enabled()) return c10::GetCPUAllocator()->allocate(n);
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, n) != 0 || p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, n, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
#endif
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
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

}  // namespace fastlayers::cpu
