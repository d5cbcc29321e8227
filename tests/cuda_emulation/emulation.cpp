// The CUDA emulation's launches (include/cuda_runtime.h): the blocks of a grid spread over the CPU's threads
// (at::parallel_for), the threads of a block as ucontext fibers on one CPU thread. A fiber runs until it waits at a
// barrier (__syncthreads: the block's threads; a warp shuffle: its warp's 32) or finishes; the scheduler resumes the
// fibers in turn (first to last, or last to first) until all have finished, and fails the launch when a full round
// makes no progress (a barrier some threads never reach).
#include <ucontext.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>
#include <vector>

#include <cuda_runtime.h>

namespace ghostfused::emulation {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 index;
  bool done = false;
};

struct Barrier {
  int arrived = 0;
  std::uint64_t generation = 0;
};

// The block running on this CPU thread.
struct Block {
  dim3 index, grid, shape;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  bool progress = false;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  // Two exchange buffers per warp, alternating by the warp barrier's generation: a lane reading round r's values
  // cannot be overwritten, since no lane writes round r + 2's before every lane has arrived for round r + 1.
  std::vector<std::uint64_t> exchange[2];
};

thread_local Block block;
std::atomic<int> pending{cudaSuccess};
std::atomic<bool> reverse_order{false};

void set_error(cudaError_t error) {
  int expected = cudaSuccess;
  pending.compare_exchange_strong(expected, error);
}

unsigned int linear(const dim3& t) { return t.x + block.shape.x * (t.y + block.shape.y * t.z); }

void yield() { swapcontext(&block.current->context, &block.scheduler); }

void wait(Barrier& barrier, int members) {
  const std::uint64_t generation = barrier.generation;
  block.progress = true;
  if (++barrier.arrived == members) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) yield();
}

void fiber_entry() {
  (*block.body)();
  block.current->done = true;
  block.progress = true;
}  // returns to uc_link, the scheduler

void run_block(const dim3& index) {
  block.index = index;
  const unsigned int threads = block.shape.x * block.shape.y * block.shape.z;
  block.fibers.resize(threads);
  block.block_barrier = {};
  block.warp_barriers.assign((threads + kWarp - 1) / kWarp, Barrier{});
  for (auto& buffer : block.exchange) buffer.assign(threads, 0);
  for (unsigned int t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.index = dim3(t % block.shape.x, (t / block.shape.x) % block.shape.y, t / (block.shape.x * block.shape.y));
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &block.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  const bool reverse = reverse_order.load();
  for (unsigned int live = threads; live > 0;) {
    block.progress = false;
    live = 0;
    for (unsigned int k = 0; k < threads; ++k) {
      Fiber& f = block.fibers[reverse ? threads - 1 - k : k];
      if (f.done) continue;
      block.current = &f;
      swapcontext(&block.scheduler, &f.context);
      live += f.done ? 0 : 1;
    }
    if (live > 0 && !block.progress) {
      std::fprintf(stderr, "cuda emulation: block (%u, %u, %u) deadlocked: %u threads wait at a barrier\n", index.x,
                   index.y, index.z, live);
      set_error(cudaErrorLaunchFailure);
      return;
    }
  }
}

}  // namespace

const dim3& thread_index() { return block.current->index; }
const dim3& block_index() { return block.index; }
const dim3& grid_dim() { return block.grid; }
const dim3& block_dim() { return block.shape; }

void sync_threads() {
  wait(block.block_barrier, static_cast<int>(block.fibers.size()));
}

void warp_shuffle_down(const void* value, std::size_t bytes, unsigned int delta, void* out) {
  const unsigned int self = linear(thread_index()), warp = self / kWarp, lane = self % kWarp;
  const unsigned int source = lane + delta < kWarp ? lane + delta : lane;
  Barrier& barrier = block.warp_barriers[warp];
  std::vector<std::uint64_t>& buffer = block.exchange[barrier.generation % 2];
  std::memcpy(&buffer[self], value, bytes);
  const int lanes = static_cast<int>(std::min<std::size_t>(kWarp, block.fibers.size() - warp * kWarp));
  wait(barrier, lanes);
  std::memcpy(out, &buffer[warp * kWarp + source], bytes);
}

void run(dim3 grid, dim3 shape, const std::function<void()>& thread_body) {
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    block.grid = grid;
    block.shape = shape;
    block.body = &thread_body;
    for (int64_t b = begin; b < end && pending.load() == cudaSuccess; ++b)
      run_block(dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<int64_t>(grid.x) * grid.y)));
  });
}

void set_reverse_order(bool reverse) { reverse_order.store(reverse); }

void fail(const char* why) {
  std::fprintf(stderr, "cuda emulation: %s\n", why);
  set_error(cudaErrorLaunchFailure);
}

cudaError_t last_error(bool clear) {
  return static_cast<cudaError_t>(clear ? pending.exchange(cudaSuccess) : pending.load());
}

}  // namespace ghostfused::emulation
