// The DFC attention branch on the GPU, shared by the dfc_attention and ghost_attn glue.
#pragma once

#include "common_glue.h"

namespace ghostfused::cuda_glue {

// One call's DFC gate on the device: pooled and z0 in the input dtype, z1, z2 and the gate in the accumulation
// dtype, all quarter resolution.
struct DfcState {
  cuda::DfcShape shape;
  at::Tensor conv_weight;        // [C, Cin]
  at::Tensor horizontal_weight;  // [C, K]
  at::Tensor vertical_weight;    // [C, K]
  at::Tensor pooled;             // [N, Cin, h * w], a view of [N, h * w, Cin] when shape.nhwc
  at::Tensor z0, z1, z2, gate;   // [N, C, h * w]; the gate's memory [N, h * w, C] when shape.nhwc
  std::vector<DeviceBatchNorm> bns;

  cuda::GateView view() const;
};

DfcState dfc_state(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                   const at::Tensor& vertical_weight, std::vector<DeviceBatchNorm> bns, const DfcSizes& sizes,
                   bool batch_statistics);

struct DfcGrads {
  at::Tensor pooled;  // [N, Cin, h * w] (dtype), in the state's pooled layout
  at::Tensor conv_weight, horizontal_weight, vertical_weight;
  std::vector<DeviceBatchNormGrad> bns;
};

// Backward from product [N, C, H, W] (accumulation dtype, dense in the state's layout): grad_out times what the
// gate multiplied.
DfcGrads dfc_backward(const DfcState& state, const at::Tensor& product, bool training);

// dx [N, Cin, H, W] (dense in the state's layout) (+)= the transposed pooling of grads.pooled.
void pool_backward(const DfcState& state, const at::Tensor& pooled_grad, at::Tensor& dx, bool accumulate);

}  // namespace ghostfused::cuda_glue
