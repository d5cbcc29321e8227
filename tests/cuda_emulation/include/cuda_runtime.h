// Host emulation of the CUDA runtime for the CPU tests (tests/cuda_emulation): with this directory first on the
// include path and GHOSTFUSED_CUDA_EMULATION defined, csrc/cuda/*.cu compile as C++ and their kernels run on the CPU,
// each block's threads as fibers that switch at __syncthreads and warp shuffles (emulation.cpp). It covers what the
// kernels use: the launch (ghostfused::cuda::launch), thread / block indices, __shared__, __syncthreads,
// __shfl_down_sync, errors and streams. Blocks run concurrently on the CPU's threads; the threads of a block run
// one at a time, so a data race between them shows only as a difference between the two thread orders
// (set_reverse_order).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
// One block runs on one CPU thread at a time: its shared memory is that thread's.
#define __shared__ static thread_local

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace ghostfused::emulation {

const dim3& thread_index();
const dim3& block_index();
const dim3& grid_dim();
const dim3& block_dim();
// Waits until every thread of the block has arrived (a thread that never arrives fails the launch).
void sync_threads();
// Publishes bytes of value for the calling thread's warp and copies into out the value of lane + delta, or its own
// past the warp's end (__shfl_down_sync; every lane of the warp must call it).
void warp_shuffle_down(const void* value, std::size_t bytes, unsigned int delta, void* out);
// Runs thread_body for every thread of every block of the grid; a deadlock makes the launch fail.
void run(dim3 grid, dim3 block, const std::function<void()>& thread_body);
// Run each block's threads last to first instead of first to last between barriers: a kernel whose threads read
// what another thread writes without a barrier in between gives different results in the two orders.
void set_reverse_order(bool reverse);
// Fails the current launch (a call the emulation does not support).
void fail(const char* why);
// The first error since the last call (clear) or still pending.
cudaError_t last_error(bool clear);

}  // namespace ghostfused::emulation

#define threadIdx (::ghostfused::emulation::thread_index())
#define blockIdx (::ghostfused::emulation::block_index())
#define gridDim (::ghostfused::emulation::grid_dim())
#define blockDim (::ghostfused::emulation::block_dim())

inline void __syncthreads() { ghostfused::emulation::sync_threads(); }

// For a full warp of 32 lanes, as CUDA's.
template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) ghostfused::emulation::fail("__shfl_down_sync with a partial mask");
  T result;
  ghostfused::emulation::warp_shuffle_down(&value, sizeof(T), delta, &result);
  return result;
}

inline cudaError_t cudaGetLastError() { return ghostfused::emulation::last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ghostfused::emulation::last_error(false); }
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    default:
      return "unspecified launch failure (emulation: a deadlock or an unsupported call, see stderr)";
  }
}
