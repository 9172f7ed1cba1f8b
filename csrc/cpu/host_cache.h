// Output buffers of the extension's CPU ops: a cache of freed large blocks, backed by transparent huge pages.
//
// A fresh multi-hundred-MB output costs more to fault in than to fill on a VM (4 KiB page faults, each zeroing
// its page: ~0.2 ms per MB measured, against ~0.07 ms per MB to write memory already mapped), and glibc maps
// every block above its mmap threshold (at most 32 MiB on 64-bit) anew and unmaps it on free, so every training
// step pays it again. Outputs of at least 32 MiB are therefore rounded up to whole 2 MiB pages, madvise'd
// MADV_HUGEPAGE when first mapped, and on release kept for the next request of the same rounded size, up to a
// byte limit (the CUDA caching allocator's idea, for host memory). Smaller outputs go to ATen's allocator:
// glibc serves them from its heap without faults once warm, faster than a fresh 2 MiB-page block (measured at
// 3 MB: 0.2 ms against 1.4-3.5 ms).
//
// Settings (read once, when the extension allocates its first output):
//   DEEPSEEK_MOE_EXT_CACHE_MB   bytes of freed blocks kept for reuse, in MiB (default 2048; 0 turns the cache
//                               off: every output then comes from ATen's allocator)
//   DEEPSEEK_MOE_EXT_HUGEPAGES  0 disables the MADV_HUGEPAGE advice (default 1)
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace deepseek_moe {

// An uninitialised tensor like at::empty(sizes, options) (CPU, contiguous); large ones come from the cache.
// kMinCachedBytes: the smallest output the cache serves.
constexpr size_t kMinCachedBytes = size_t(32) << 20;
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// [cached bytes, cache limit, bytes in use from the cache allocator, hits, misses, huge-page advice on (0/1)].
std::vector<int64_t> host_cache_info();
// Frees every cached block (blocks still in use are unaffected).
void host_cache_empty();
// Sets the cache limit in bytes (frees cached blocks above it); < 0 restores the environment's setting.
void host_cache_set_limit(int64_t bytes);

}  // namespace deepseek_moe
