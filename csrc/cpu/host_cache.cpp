// The extension's host block cache (see host_cache.h for why it exists and how it is configured).

#include "host_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace deepseek_moe {
namespace {

// The x86-64/arm64 transparent huge page size: cached blocks are whole pages.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr int64_t kDefaultLimitMiB = 2048;

int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  try {
    return std::stoll(value);
  } catch (const std::exception&) {
    TORCH_CHECK(false, name, " must be an integer, got '", value, "'");
  }
}

size_t round_up(size_t n) { return (n + kHugePage - 1) / kHugePage * kHugePage; }

struct Block {
  void* ptr;
  size_t bytes;      // mapped size, a multiple of kHugePage
  size_t requested;  // what the tensor asked for (reported to the profiler)
};

class HostCache final : public c10::Allocator {
 public:
  HostCache()
      : env_limit_(static_cast<size_t>(std::max<int64_t>(0, env_int("DEEPSEEK_MOE_EXT_CACHE_MB", kDefaultLimitMiB)))
                   << 20),
        limit_(env_limit_),
        hugepages_(env_int("DEEPSEEK_MOE_EXT_HUGEPAGES", 1) != 0) {}

  // Leaked on purpose: tensors from the cache may be freed during interpreter shutdown, after static destructors.
  static HostCache& instance() {
    static HostCache* cache = new HostCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = round_up(std::max<size_t>(n, 1));
    Block* block = take(bytes, n);
    if (block == nullptr) block = map_new(bytes, n);
    report(block->ptr, static_cast<int64_t>(n));
    return {block->ptr, block, &HostCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(limit_), static_cast<int64_t>(in_use_), hits_, misses_,
            hugepages_ ? 1 : 0};
  }

  bool enabled() {
    std::lock_guard<std::mutex> guard(mutex_);
    return limit_ > 0;
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    limit_ = bytes < 0 ? env_limit_ : static_cast<size_t>(bytes);
    trim_locked(limit_);
  }

  void empty() {
    std::lock_guard<std::mutex> guard(mutex_);
    trim_locked(0);
  }

 private:
  // A cached block of exactly `bytes`, or one at most a quarter larger (a near size class wastes little).
  Block* take(size_t bytes, size_t requested) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto it = free_.lower_bound(bytes);
    if (it == free_.end() || it->first > bytes + bytes / 4) {
      ++misses_;
      return nullptr;
    }
    Block* block = new Block{it->second, it->first, requested};
    cached_ -= it->first;
    free_.erase(it);
    in_use_ += block->bytes;
    ++hits_;
    return block;
  }

  Block* map_new(size_t bytes, size_t requested) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, bytes) != 0) {
      empty();  // cached blocks of other sizes may be what stands in the way
      TORCH_CHECK(posix_memalign(&ptr, kHugePage, bytes) == 0, "deepseek_moe extension: out of memory allocating ",
                  bytes, " bytes for an op output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advice only: where THP is off or unavailable the block simply stays on 4 KiB pages.
    if (hugepages_) madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
    std::lock_guard<std::mutex> guard(mutex_);
    in_use_ += bytes;
    return new Block{ptr, bytes, requested};
  }

  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    HostCache& cache = instance();
    cache.report(block->ptr, -static_cast<int64_t>(block->requested));
    {
      std::lock_guard<std::mutex> guard(cache.mutex_);
      cache.in_use_ -= block->bytes;
      if (cache.cached_ + block->bytes <= cache.limit_) {
        cache.free_.emplace(block->bytes, block->ptr);
        cache.cached_ += block->bytes;
        block->ptr = nullptr;
      }
    }
    std::free(block->ptr);
    delete block;
  }

  // Frees cached blocks, largest first, until at most `keep` bytes stay cached.
  void trim_locked(size_t keep) {
    while (cached_ > keep && !free_.empty()) {
      auto it = std::prev(free_.end());
      std::free(it->second);
      cached_ -= it->first;
      free_.erase(it);
    }
  }

  // Keeps torch.profiler's memory records (and so CPU peak-memory figures) complete for these blocks.
  void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t in_use, reserved;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      in_use = in_use_;
      reserved = in_use_ + cached_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, in_use, reserved, c10::Device(c10::DeviceType::CPU));
  }

  const size_t env_limit_;
  size_t limit_;
  const bool hugepages_;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, in_use_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_output: CPU tensors only");
  HostCache& cache = HostCache::instance();
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes < kMinCachedBytes || !cache.enabled()) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

std::vector<int64_t> host_cache_info() { return HostCache::instance().info(); }

void host_cache_empty() { HostCache::instance().empty(); }

void host_cache_set_limit(int64_t bytes) { HostCache::instance().set_limit(bytes); }

}  // namespace deepseek_moe
