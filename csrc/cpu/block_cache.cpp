#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace ghostfused::cpu {
namespace {

// Smaller requests come from glibc's heap, which keeps them mapped.
constexpr size_t kMinBlock = 128 * 1024;
// Block sizes are rounded up to a multiple of this (whole pages), so that a block serves every request that rounds
// to its size.
constexpr size_t kGranule = 64 * 1024;

size_t limit_from_environment() {
  const char* value = std::getenv("GHOSTFUSED_CPU_CACHE_MB");
  if (value == nullptr || *value == '\0') return size_t(256) << 20;
  return static_cast<size_t>(std::max(std::atoll(value), 0LL)) << 20;
}

class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive static destructors
    return *cache;
  }

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t bytes) override {
    const size_t rounded = std::max<size_t>((bytes + kGranule - 1) / kGranule, 1) * kGranule;
    void* data = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(rounded);
      if (it != idle_.end() && !it->second.empty()) {
        data = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= rounded;
        ++reused_;
      }
    }
    if (data == nullptr) data = c10::alloc_cpu(rounded);
    return {data, new Block{data, rounded}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  BlockCacheInfo info() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(limit_), reused_};
  }

  void clear() {
    std::vector<void*> blocks;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      take_all_idle(blocks);
    }
    for (void* data : blocks) c10::free_cpu(data);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  BlockCache() : limit_(limit_from_environment()) {}

  static void release(void* context) {
    const std::unique_ptr<Block> block(static_cast<Block*>(context));
    instance().keep(block->data, block->bytes);
  }

  // A released block becomes idle; over the bound, every idle block is freed first (a workload whose blocks fit
  // keeps them all; one that does not, frees them rather than hold the stale ones).
  void keep(void* data, size_t bytes) {
    std::vector<void*> blocks;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        blocks.push_back(data);
      } else {
        if (idle_bytes_ + bytes > limit_) take_all_idle(blocks);
        idle_[bytes].push_back(data);
        idle_bytes_ += bytes;
      }
    }
    for (void* block : blocks) c10::free_cpu(block);
  }

  // Called with mutex_ held.
  void take_all_idle(std::vector<void*>& blocks) {
    for (auto& [bytes, list] : idle_) blocks.insert(blocks.end(), list.begin(), list.end());
    idle_.clear();
    idle_bytes_ = 0;
  }

  const size_t limit_;
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> idle_;  // idle blocks by size
  size_t idle_bytes_ = 0;
  int64_t reused_ = 0;
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat memory_format) {
  BlockCache& cache = BlockCache::instance();
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (!cache.enabled() || bytes < kMinBlock)
    return at::empty(sizes, options.memory_format(memory_format));
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), memory_format);
}

BlockCacheInfo block_cache_info() { return BlockCache::instance().info(); }

void block_cache_clear() { BlockCache::instance().clear(); }

}  // namespace ghostfused::cpu
