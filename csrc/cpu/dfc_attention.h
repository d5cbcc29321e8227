// The DFC attention branch on the CPU (pooling, 1x1 convolution, horizontal and vertical depthwise convolutions,
// three BatchNorms, sigmoid), shared by the dfc_attention and ghost_attn kernels. All of it runs at quarter
// resolution; only the pooling reads, and its backward writes, full-resolution data.
#pragma once

#include <functional>

#include "common.h"

namespace ghostfused::cpu {

// One call's DFC gate in the compute dtype T. The gate is NCHW; the pooled input and the stages between them are
// NHWC ([N, h * w, C]), so that the per-pixel work is vectorised over channels even for a 3x3 gate.
template <typename T>
struct DfcGate {
  DfcSizes sizes;
  int64_t batch, in_channels, height, width;
  at::Tensor conv_weight;        // [C, Cin]
  at::Tensor horizontal_taps;    // [K, C]: tap b of every channel contiguous
  at::Tensor vertical_taps;      // [K, C]
  bool nhwc;                     // x dense channels_last in T: the pooled input's gradient has NHWC strides
  at::Tensor pooled;             // [N, Cin, h * w] with NHWC strides: 2x2 average pool of x
  at::Tensor z0, z1, z2;         // [N, h * w, C]: the three convolutions (z1, z2 kept only when asked)
  at::Tensor gate;               // [N, C, h * w]
  std::vector<BatchNorm> bns;    // conv, horizontal, vertical: with the statistics they normalise with
  Folded<T> affine[3];            // each BatchNorm folded

  // The gate with its upsampling to x's resolution.
  Gate<T> view() const {
    return Gate<T>(gate.template data_ptr<T>(), sizes.channels, sizes.pooled_h, sizes.pooled_w, height, width,
                   sizes.nearest);
  }
};

// Called by the task that has written the gate's planes [c0, c0 + count) of sample n, with the gate's view.
template <typename T>
using GateBlockDone = std::function<void(const Gate<T>& gate, int64_t n, int64_t c0, int64_t count)>;

// The gate of x [N, Cin, H, W] (any layout): batch statistics when batch_statistics, else the given bn mean / var.
// keep_intermediates keeps z1 and z2 for dfc_gate_backward. block_done, when given, runs on each block of the gate
// as soon as it is written, in the task that wrote it (a consumer of those planes then reads them from its cache).
template <typename T>
DfcGate<T> dfc_gate(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                    const at::Tensor& vertical_weight, std::vector<BatchNorm> bns, const DfcSizes& sizes,
                    bool batch_statistics, bool keep_intermediates, const GateBlockDone<T>& block_done = {});

// Gradients of the DFC gate, in the compute dtype.
struct DfcGrads {
  at::Tensor pooled;             // [N, Cin, h * w]: gradient of the pooled input (NHWC strides when nhwc)
  at::Tensor conv_weight;        // [C, Cin]
  at::Tensor horizontal_weight;  // [C, K]
  at::Tensor vertical_weight;    // [C, K]
  std::vector<std::vector<double>> bn_weight, bn_bias;  // one vector per BatchNorm
};

// Backward from dgate [N, C, h * w] (the gradient of the gate) to the gate's inputs; g from dfc_gate with
// keep_intermediates and the saved statistics.
template <typename T>
DfcGrads dfc_gate_backward(const DfcGate<T>& g, const T* dgate, bool training);

// dx [N, Cin, H, W] = the transposed 2x2 average pooling of pooled_grad [N, Cin, h * w], added to dx when
// accumulate (zero in the rows / columns the pooling dropped). Dense NCHW, or dense NHWC when nhwc (pooled_grad
// with NHWC strides, as dfc_gate_backward returns it then).
template <typename T>
void pool_backward(const at::Tensor& pooled_grad, int64_t height, int64_t width, T* dx, bool accumulate,
                   bool nhwc);

}  // namespace ghostfused::cpu
