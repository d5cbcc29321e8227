// The Ghost branches on the GPU, shared by the ghost_concat and ghost_attn glue.
#pragma once

#include "common_glue.h"

namespace ghostfused::cuda_glue {

// One call's primary and cheap branches on the device.
struct GhostState {
  GhostSizes sizes;
  bool relu;
  bool nhwc;                  // x channels_last: every full-resolution tensor NHWC
  at::Tensor x;               // [N, Cin, H * W] (dtype), a view of [N, H * W, Cin] when nhwc
  at::Tensor primary_weight;  // [init, Cin]
  at::Tensor cheap_weight;    // [cheap, dw * dw]
  at::Tensor y1;              // [N, init, H * W]: the primary convolution, in x's layout
  DeviceBatchNorm primary_bn, cheap_bn;

  // The launchers' view, with the gate (null data: none).
  cuda::GhostArgs args(const cuda::GateView& gate) const;
};

// y1 and the BatchNorms' statistics (batch statistics when batch_statistics, else the given ones), folded.
GhostState ghost_state(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
                       DeviceBatchNorm primary_bn, DeviceBatchNorm cheap_bn, const GhostSizes& sizes, bool relu,
                       bool batch_statistics);

// Gradients of the Ghost branches.
struct GhostGrads {
  at::Tensor x, primary_weight, cheap_weight;  // [N, Cin, H * W] (x's layout), [init, Cin], [cheap, dw * dw]
  DeviceBatchNormGrad primary_bn, cheap_bn;
};

// Backward for grad_out [N, oup, H, W] (dense in the state's layout, dtype). With a gate, product [N, oup, H, W]
// (accumulation dtype, same layout) receives grad_out times the ungated output (for the gate's gradient).
GhostGrads ghost_backward(const GhostState& state, const at::Tensor& grad_out, const cuda::GateView& gate,
                          const at::Tensor& product, bool training);

}  // namespace ghostfused::cuda_glue
