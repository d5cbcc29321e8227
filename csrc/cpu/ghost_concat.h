// The Ghost module's primary and cheap branches on the CPU, shared by the ghost_concat and ghost_attn kernels.
#pragma once

#include "common.h"

namespace ghostfused::cpu {

// One call's primary and cheap branches, on x dense NCHW or (nhwc) dense NHWC, in the compute dtype T.
template <typename T>
struct GhostBranch {
  GhostSizes sizes;
  bool relu;
  bool nhwc;                  // x channels_last: x, the output, grad_out and the input gradient are dense NHWC
  at::Tensor x;               // [N, Cin, H * W] (NHWC strides when nhwc)
  at::Tensor primary_weight;  // [init, Cin]
  at::Tensor cheap_weight;    // [cheap, dw * dw]
  at::Tensor y1;              // the primary 1x1 convolution, one GEMM over the batch: [N, init, H * W], or
                              // channel-major [init, N * H * W] when nhwc
  PlaneLayout y1_layout;
  BatchNorm primary_bn, cheap_bn;  // with the statistics they normalise with
  Folded<T> primary_affine, cheap_affine;
  // y1's and cheap_weight's data, read per plane (Tensor::data_ptr checks the tensor at every call)
  const T* y1_data = nullptr;
  const T* cheap_taps = nullptr;

  const T* y1_plane(int64_t n, int64_t c) const { return y1_data + y1_layout.offset(n, c); }
};

// The primary convolution y1 and the BatchNorms' statistics: the batch statistics when batch_statistics (one
// read of y1, one of y1 recomputing the cheap convolution), else the given bn mean / var. x channels_last takes the
// NHWC path. saved_y1: y1 as a forward returned it (flat, in T), read instead of recomputing the GEMM; undefined or
// empty: computed here.
template <typename T>
GhostBranch<T> ghost_branch(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
                            BatchNorm primary_bn, BatchNorm cheap_bn, const GhostSizes& sizes, bool relu,
                            bool batch_statistics, const at::Tensor& saved_y1);

// What a training forward returns as `saved` (the primary convolution's output, flat), and an empty tensor in eval
// (ghostfused/ops/define.py).
template <typename T>
at::Tensor saved_primary(const GhostBranch<T>& branch, bool training);

// out [N, oup, H, W] (dense NCHW, or dense NHWC when branch.nhwc) = cat(act(BN0(y1)),
// act(BN1(depthwise(.))))[:, :oup], times the upsampled gate when one is given (gate channel c multiplies output
// channel c), writing each output element once. NCHW: one pass per primary plane, cache-blocked over rows. NHWC:
// one pass per (sample, row block) computing act(BN0(y1)) for the block and its halo rows, the cheap depthwise
// convolution vectorised over channels, BN1, act and the gate.
template <typename T>
void ghost_write(const GhostBranch<T>& branch, const Gate<T>* gate, T* out);

// Gradients of a Ghost branch, in the compute dtype.
struct GhostGrads {
  at::Tensor x;               // [N, Cin, H, W] in x's layout
  at::Tensor primary_weight;  // [init, Cin]
  at::Tensor cheap_weight;    // [cheap, dw * dw]
  std::vector<double> primary_bn_weight, primary_bn_bias, cheap_bn_weight, cheap_bn_bias;
};

// Backward of ghost_write for grad_out [N, oup, H, W] (dense, in the branch's layout). With a gate, dgate [N, oup, h * w] receives
// the gradient of the quarter-resolution gate (every plane written). training: the statistics are the batch's
// and the gradient flows through them.
template <typename T>
GhostGrads ghost_backward(const GhostBranch<T>& branch, const T* grad_out, const Gate<T>* gate, T* dgate,
                          bool training);

}  // namespace ghostfused::cpu
