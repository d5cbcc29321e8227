// Host emulation (tests/cuda_emulation): the one function of ATen's CUDA context that the glue uses. Launches run
// synchronously on the CPU; the stream is a null handle.
#pragma once
#include <cuda_runtime_api.h>

namespace at::cuda {
struct EmulatedStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return {}; }
}  // namespace at::cuda
