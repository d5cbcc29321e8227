// Kernels that check the emulation itself (tests/test_cuda_emulation.py): warp shuffles, barriers, the block
// reduction of cuda_common.cuh, a barrier some threads never reach, and a race. Op
// ghostfused_emulation::self_test(name) returns one block's per-thread results (double [kBlock]) and the launch's
// error code (int64 [1]); ghostfused_emulation::set_reverse_order sets the order in which a block's threads run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "ghostfused/cuda_common.cuh"

namespace ghostfused::cuda {
namespace {

__global__ void shuffle_kernel(double* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<double>(threadIdx.x), 5);
}

__global__ void barrier_kernel(double* out) {
  __shared__ double values[kBlock];
  values[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = values[kBlock - 1 - threadIdx.x];
}

__global__ void block_sum_kernel(double* out) {
  double v[1] = {threadIdx.x + 1.0};
  block_sum(v);
  out[threadIdx.x] = threadIdx.x == 0 ? v[0] : -1.0;
}

__global__ void race_kernel(double* out, double base) {  // reads a neighbour's shared value without a barrier
  __shared__ double values[kBlock];
  values[threadIdx.x] = base + threadIdx.x;
  out[threadIdx.x] = values[(threadIdx.x + 1) % kBlock];
}

__global__ void missed_barrier_kernel(double* out) {
  if (threadIdx.x != 0) __syncthreads();
  out[threadIdx.x] = 1.0;
}

std::tuple<at::Tensor, at::Tensor> self_test(c10::string_view name) {
  at::Tensor out = at::full({kBlock}, std::nan(""), at::kDouble);
  double* data = out.data_ptr<double>();
  cudaError_t error = cudaErrorInvalidValue;
  if (name == "shuffle") error = launch(shuffle_kernel, dim3(1), nullptr, data);
  if (name == "barrier") error = launch(barrier_kernel, dim3(1), nullptr, data);
  if (name == "block_sum") error = launch(block_sum_kernel, dim3(1), nullptr, data);
  static double launches = 0;  // each race launch writes values no earlier launch left in shared memory
  if (name == "race") error = launch(race_kernel, dim3(1), nullptr, data, kBlock * ++launches);
  if (name == "missed_barrier") error = launch(missed_barrier_kernel, dim3(1), nullptr, data);
  return {out, at::full({1}, static_cast<int64_t>(error), at::kLong)};
}

}  // namespace
}  // namespace ghostfused::cuda

TORCH_LIBRARY(ghostfused_emulation, m) {
  m.def("self_test(str name) -> (Tensor, Tensor)", &ghostfused::cuda::self_test);
  m.def("set_reverse_order(bool reverse) -> ()",
        [](bool reverse) { ghostfused::emulation::set_reverse_order(reverse); });
}
