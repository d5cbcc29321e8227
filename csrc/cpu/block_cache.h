// A cache of freed CPU memory blocks for the kernels' outputs and large temporaries.
//
// glibc's malloc hands blocks of more than about 128 KiB to the kernel (mmap / munmap, or a trimmed heap top), so
// every fresh output or temporary of a fused op page-faulted on first touch, at every call (in the fused model at
// batch 8, 99% of its page faults: benchmarks/results/cpu-20261205-221639/perf_page_faults_cache_0.log). Blocks from
// this cache go back to it when their tensor dies and serve the next request of the same rounded size, already
// mapped. Idle blocks are bounded (GHOSTFUSED_CPU_CACHE_MB, default 256; 0 turns the cache off): a release that
// would exceed the bound first frees every idle block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ghostfused::cpu {

// An uninitialised CPU tensor of `sizes` (and memory_format) whose memory comes from the cache when it is large
// (options must name the CPU: csrc/glue.cpp's empty_output sends only CPU outputs here).
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat memory_format = at::MemoryFormat::Contiguous);

// The cache's state, for tests: idle bytes held, their bound, and how many requests it served from idle blocks.
struct BlockCacheInfo {
  int64_t idle_bytes, limit_bytes, reused;
};
BlockCacheInfo block_cache_info();

// Free every idle block.
void block_cache_clear();

}  // namespace ghostfused::cpu
