// Output tensors of the CPU ops, and (through workspace_alloc in gemm.h) the
// kernels' large workspaces. Blocks of 64 KiB and more are pages mapped from
// the kernel, outside glibc's heap, so they never fragment it; blocks of 2 MiB
// and more are 2 MiB aligned and advised for transparent huge pages
// (MADV_HUGEPAGE), as torch itself does when THP_MEM_ALLOC_ENABLE=1: a fresh
// 50 MB output then takes ~25 page faults instead of ~12,000, which on this VM
// is ~20 ms of a 45 ms BatchNorm. Freed blocks are cached for reuse, bounded:
// a miss unmaps cached blocks before it maps a new one once more than a slack
// is cached, so the cache adds at most that slack to the peak (alloc.cpp). Smaller blocks come from torch's CPU
// allocator (workspaces: aligned_alloc). FASTLAYERS_THP=0 turns the huge-page
// path off (read once).
#pragma once
#include <ATen/ATen.h>

namespace fastlayers::cpu {

// Like at::empty(sizes, opts) (opts' memory format honoured), CPU only.
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts);

// Like at::empty_like(t, t.options().memory_format(fmt)).
at::Tensor empty_like(const at::Tensor& t, at::MemoryFormat fmt);

// Frees the cached blocks; returns the bytes freed.
int64_t empty_cache();
// Bytes held in the cache now.
int64_t cached_bytes();
// Fresh blocks mapped so far (requests the cache could not serve).
int64_t blocks_mapped();

}  // namespace fastlayers::cpu
