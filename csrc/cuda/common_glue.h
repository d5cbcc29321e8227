// Torch glue shared by the CUDA ops (csrc/cuda/*_glue.cpp, compiled only with a CUDA build of torch): dtype
// mapping, launch error checks, the current stream, BatchNorm state on the device, and the 1x1 convolutions as
// cuBLAS GEMMs through ATen.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../glue.h"
#include "ghostfused/cuda_launchers.h"

namespace ghostfused::cuda_glue {

using cuda::DType;

DType dtype_of(const at::Tensor& t);
// The accumulation dtype of per-channel coefficients and quarter-resolution intermediates.
at::ScalarType acc_dtype(const at::Tensor& x);
// TORCH_CHECK that a launcher succeeded.
void check(cudaError_t error, const char* what);
cudaStream_t current_stream();

// Whether an op on x runs its full-resolution tensors NHWC: x is channels_last (memory_format_of).
bool is_nhwc(const at::Tensor& x);
// t detached and dense, NHWC (channels_last) when nhwc, else NCHW (a copy only when t is not already).
at::Tensor dense(const at::Tensor& t, bool nhwc = false);
// An uninitialised [N, C, H, W] tensor, channels_last when nhwc.
at::Tensor empty_full_resolution(at::IntArrayRef sizes, const at::TensorOptions& options, bool nhwc);

// A BatchNorm on the device: parameters and the statistics it normalises with (double [C]), the folded map
// (accumulation dtype [C]), and the group whose batch it normalises over in training.
struct DeviceBatchNorm {
  at::Tensor weight, bias, mean, var;
  double eps;
  at::Tensor scale, shift;
  SyncGroup sync;
};

std::vector<DeviceBatchNorm> device_batch_norms(at::TensorList bn_weight, at::TensorList bn_bias,
                                                at::TensorList bn_mean, at::TensorList bn_var,
                                                at::ArrayRef<double> bn_eps, const SyncGroup& sync);

// Per-channel partial sums of count values per channel: Moments (3 doubles) or GradSums (2 doubles) per chunk.
at::Tensor moments_partials(int64_t count, int64_t channels, const at::Tensor& like);
at::Tensor grad_sums_partials(int64_t count, int64_t channels, const at::Tensor& like);

// The batch statistics from moments partials (the group's when the BatchNorm synchronises), then the folded map;
// without partials, the folded map of the given statistics alone.
void finish_batch_norm(DeviceBatchNorm& bn, const at::Tensor* moments, int64_t count, DType dtype);

// The BatchNorm backward from grad-sums partials (zeros when undefined): coefficients a, b, c (accumulation
// dtype; in training from the group's sums when the BatchNorm synchronises) and the parameter gradients (double,
// from this process's sums, as nn.SyncBatchNorm's).
struct DeviceBatchNormGrad {
  at::Tensor a, b, c, weight_grad, bias_grad;
};
DeviceBatchNormGrad batch_norm_backward(const DeviceBatchNorm& bn, const at::Tensor& partials, int64_t count,
                                        bool training, const at::Tensor& x);

// The forward's `saved` result: the CUDA backward recomputes what it needs (ghostfused/ops/define.py).
at::Tensor nothing_saved(const at::Tensor& x);

// The op's packed statistics / BatchNorm gradients: the double [C] tensors concatenated, in the stats dtype of x.
at::Tensor packed(const std::vector<at::Tensor>& values, const at::Tensor& x);

// [N, out, L] = weight [out, in] @ x [N, in, L] (cuBLAS, fp32 accumulation for half types), x in either layout
// (strides [in * L, L, 1] or [in * L, 1, in]). The result is NCHW, or with nhwc a view of [N, L, out] (one GEMM
// over all the pixels).
at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight, bool nhwc);
// [out, in] = sum over n of grad[n] @ input[n]^T; one GEMM over all the pixels when both are NHWC views.
at::Tensor conv1x1_weight_grad(const at::Tensor& grad, const at::Tensor& input);
// [C, taps] from per-chunk partials [chunks, C, taps] (double), summed over the chunks, in dtype.
at::Tensor tap_grad(const at::Tensor& partials, at::ScalarType dtype);

}  // namespace ghostfused::cuda_glue
