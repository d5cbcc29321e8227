// Raw-pointer launchers of the CUDA kernels (csrc/cuda/*.cu), called by the torch glue (csrc/cuda/*_glue.cpp).
// No torch types here: the .cu files compile with nvcc alone, in about a second each.
//
// Conventions: full-resolution tensors ([N, C, H, W]: x, features, outputs and their gradients, y1, dy2, product)
// are dense, NCHW or NHWC (channels_last) as the shape's `nhwc` says, all of one call in the same layout; the
// quarter-resolution DFC intermediates after the pooling are NCHW, but for the gate and its gradient, which follow
// the call's layout. `dtype` is the element type of the op's inputs and
// outputs; per-channel coefficients (BatchNorm scale / shift, backward coefficients) and the quarter-resolution DFC
// intermediates are in the accumulation type Acc (float, double for float64 inputs); statistics and their partial
// sums are double. Reductions are deterministic: a per-channel reduction splits each channel's values into fixed
// chunks of kReduceChunk (independent of the device), sums each chunk in a fixed order (NCHW: one block per (chunk,
// channel) and a fixed-order tree in it; NHWC: one thread per (chunk, channel), in order), then combines the chunks
// in order. Every launcher checks cudaGetLastError after each launch and returns the first error.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace ghostfused::cuda {

enum class DType { Float32, Float64, Float16, BFloat16 };

// Values per block of the per-channel reductions.
constexpr int64_t kReduceChunk = 1024;

// Number of chunks of a per-channel reduction over count values.
inline int64_t reduce_chunks(int64_t count) { return count > 0 ? (count + kReduceChunk - 1) / kReduceChunk : 1; }

// ---- BatchNorm statistics and coefficients (statistics.cu) -----------------------------------------------------

// partials[chunk][c] = Moments of the values of channel c of data [N, C, L] ([N, L, C] when nhwc) (dtype) in that
// chunk.
cudaError_t launch_channel_moments(DType dtype, const void* data, int64_t batch, int64_t channels, int64_t size,
                                   bool nhwc, void* partials, cudaStream_t stream);
// mean[c], var[c] (biased) from partials[chunks][c] (Moments), combined in chunk order.
cudaError_t launch_finish_moments(const void* partials, int64_t chunks, int64_t channels, double* mean,
                                  double* var, cudaStream_t stream);
// scale[c], shift[c] (Acc) of the BatchNorm with the given statistics (all double arrays).
cudaError_t launch_fold_batch_norm(DType dtype, const double* weight, const double* bias, const double* mean,
                                   const double* var, double eps, int64_t channels, void* scale, void* shift,
                                   cudaStream_t stream);
// The BatchNorm backward from partial sums (partials[chunks][c] = GradSums): coefficients a, b, c (Acc) with
// dx = a dy + b x + c, and the weight / bias gradients (double).
cudaError_t launch_batch_norm_backward(DType dtype, const double* weight, const double* mean, const double* var,
                                       double eps, const void* partials, int64_t chunks, int64_t channels,
                                       double count, bool training, void* coef_a, void* coef_b, void* coef_c,
                                       double* weight_grad, double* bias_grad, cudaStream_t stream);
// grad = a * grad + b * x + c per channel, for grad and x [N, C, L] ([N, L, C] when nhwc) (dtype).
cudaError_t launch_batch_norm_input_grad(DType dtype, void* grad, const void* x, const void* coef_a,
                                         const void* coef_b, const void* coef_c, int64_t batch, int64_t channels,
                                         int64_t size, bool nhwc, cudaStream_t stream);

// ---- The Ghost module's primary and cheap branches (ghost_concat.cu) ------------------------------------------

struct GhostShape {
  int64_t batch, height, width;
  int64_t init, cheap, multiplier, oup, dw;  // cheap channel j reads primary channel j / multiplier
  bool relu;
  bool nhwc;  // the layout of x, y1, dy2, grad_out, product and the output
};

// The quarter-resolution DFC gate [N, channels, h, w] (Acc, in the call's layout), upsampled to the Ghost output's
// [H, W].
struct GateView {
  const void* data;  // null: no gate
  int64_t channels, h, w;
  bool nearest;
};

struct GhostArgs {
  GhostShape shape;
  DType dtype;
  const void* y1;            // [N, init, H, W]: the primary 1x1 convolution (dtype)
  const void* cheap_weight;  // [cheap, dw * dw] (dtype)
  const void* scale0;        // [init] (Acc): the primary BatchNorm folded
  const void* shift0;
  const void* scale1;        // [cheap] (Acc): the cheap BatchNorm folded
  const void* shift1;
  GateView gate;
};

// out [N, oup, H, W] (dtype) = cat(act(BN0(y1)), act(BN1(depthwise(.))))[:, :oup] times the upsampled gate:
// every output element written once.
cudaError_t launch_ghost_write(const GhostArgs& args, void* out, cudaStream_t stream);
// partials[chunk][j] (Moments) of the cheap convolution's output (before its BatchNorm), every cheap channel.
cudaError_t launch_cheap_moments(const GhostArgs& args, void* partials, cudaStream_t stream);
// partials[chunk][j] (GradSums: sum dv, sum dv * (y2 - cheap_mean)) with dv the gradient of the cheap BatchNorm's
// output, for grad_out [N, oup, H, W] (dtype); zero for dropped channels.
cudaError_t launch_cheap_grad_sums(const GhostArgs& args, const void* grad_out, const double* cheap_mean,
                                   void* partials, cudaStream_t stream);
// The cheap branch's backward: dy2 [N, cheap, H, W] (Acc) = a1 dv + b1 y2 + c1 (zero for dropped channels),
// partials[chunk][j] as launch_cheap_grad_sums, and with a gate product [N, oup, H, W] (Acc) = grad_out times the
// ungated output in the cheap channels.
cudaError_t launch_cheap_backward(const GhostArgs& args, const void* grad_out, const void* coef_a,
                                  const void* coef_b, const void* coef_c, const double* cheap_mean, void* dy2,
                                  void* product, void* partials, cudaStream_t stream);
// partials[chunk][j][t] (double) = sum of dy2 times the input of tap t: the cheap depthwise weight gradient.
cudaError_t launch_cheap_weight_grad(const GhostArgs& args, const void* dy2, double* partials, cudaStream_t stream);
// The primary channel's backward: y1_grad [N, init, H, W] (dtype) = out_scale (Acc [init]) times the gradient of
// the primary BatchNorm's output (grad_out times the gate plus the cheap branch's transposed convolution of dy2,
// through the activation); partials[chunk][c] (GradSums against primary_mean); with a gate, the primary channels of
// product.
cudaError_t launch_primary_backward(const GhostArgs& args, const void* grad_out, const void* dy2,
                                    const void* out_scale, const double* primary_mean, void* y1_grad, void* product,
                                    void* partials, cudaStream_t stream);

// ---- The DFC attention branch (dfc_attention.cu) ---------------------------------------------------------------

struct DfcShape {
  int64_t batch, in_channels, height, width;  // x
  int64_t channels, h, w, k;                  // the gate: C channels at [h, w] = [H / 2, W / 2], kernel K
  bool nearest;
  bool nhwc;  // the layout of x, features, the output, their gradients, product, and pooled ([N, h, w, Cin])
};

// pooled [N, Cin, h, w] (dtype; NHWC with x) = 2x2 average pool of x [N, Cin, H, W].
cudaError_t launch_average_pool(DType dtype, const DfcShape& shape, const void* x, void* pooled,
                                cudaStream_t stream);
// z_out (Acc) = the depthwise (1, K) (horizontal) or (K, 1) (vertical) convolution of scale * z_in + shift, for
// z_in [N, C, h, w] (dtype when in_is_dtype, else Acc) and taps [C, K] (dtype).
cudaError_t launch_dfc_conv(DType dtype, const DfcShape& shape, bool horizontal, const void* z_in, bool in_is_dtype,
                            const void* scale, const void* shift, const void* taps, void* z_out,
                            cudaStream_t stream);
// gate (Acc, in the call's layout) = sigmoid(scale * z + shift), z [N, C, h, w] (Acc).
cudaError_t launch_dfc_sigmoid(DType dtype, const DfcShape& shape, const void* z, const void* scale,
                               const void* shift, void* gate, cudaStream_t stream);
// out [N, C, H, W] (dtype) = features times the upsampled gate.
cudaError_t launch_gate_product(DType dtype, const DfcShape& shape, const void* features, const void* gate,
                                void* out, cudaStream_t stream);
// dfeatures = grad_out times the upsampled gate; product (Acc) = grad_out times features.
cudaError_t launch_gate_product_backward(DType dtype, const DfcShape& shape, const void* grad_out,
                                         const void* features, const void* gate, void* dfeatures, void* product,
                                         cudaStream_t stream);
// dgate [N, C, h, w] (Acc, the gate's layout) = the transposed upsampling of product [N, C, H, W] (Acc), each gate
// element a gather over its full-resolution window in a fixed order.
cudaError_t launch_gate_grad(DType dtype, const DfcShape& shape, const void* product, void* dgate,
                             cudaStream_t stream);
// du (Acc, NCHW) = sigmoid'(dgate, gate): the gradient of the last BatchNorm's output.
cudaError_t launch_sigmoid_backward(DType dtype, const DfcShape& shape, const void* dgate, const void* gate,
                                    void* du, cudaStream_t stream);
// partials[chunk][c] (GradSums) of du against z (both [N, C, h, w]; z in dtype when z_is_dtype, else Acc).
cudaError_t launch_dfc_grad_sums(DType dtype, const DfcShape& shape, const void* du, const void* z, bool z_is_dtype,
                                 const double* mean, void* partials, cudaStream_t stream);
// dz (Acc) = a du + b z + c per channel.
cudaError_t launch_dfc_input_grad(DType dtype, const DfcShape& shape, const void* du, const void* z, bool z_is_dtype,
                                  const void* coef_a, const void* coef_b, const void* coef_c, void* dz,
                                  cudaStream_t stream);
// Backward of launch_dfc_conv for its output gradient dz (Acc): partials[chunk][c][t] (double) of the weight
// gradient, and du_in (Acc) = the transposed convolution (the gradient of scale * z_in + shift).
cudaError_t launch_dfc_conv_backward(DType dtype, const DfcShape& shape, bool horizontal, const void* dz,
                                     const void* z_in, bool in_is_dtype, const void* scale, const void* shift,
                                     const void* taps, double* tap_partials, void* du_in, cudaStream_t stream);
// dx [N, Cin, H, W] (dtype) (+)= the transposed 2x2 average pooling of pooled_grad [N, Cin, h, w] (dtype; NHWC
// with x).
cudaError_t launch_pool_backward(DType dtype, const DfcShape& shape, const void* pooled_grad, void* dx,
                                 bool accumulate, cudaStream_t stream);

}  // namespace ghostfused::cuda
