// ghost_concat on the GPU: argument checks, the primary convolution (cuBLAS), statistics and the fused write.
#include "ghost_concat_glue.h"

#include <torch/library.h>

namespace ghostfused::cuda_glue {

cuda::GhostArgs GhostState::args(const cuda::GateView& gate) const {
  const GhostSizes& s = sizes;
  auto data = [](const at::Tensor& t) -> const void* { return t.defined() ? t.data_ptr() : nullptr; };
  return {{s.batch, s.height, s.width, s.init, s.cheap, s.multiplier, s.oup, s.dw, relu, nhwc},
          dtype_of(x),
          y1.data_ptr(),
          cheap_weight.data_ptr(),
          data(primary_bn.scale),
          data(primary_bn.shift),
          data(cheap_bn.scale),
          data(cheap_bn.shift),
          gate};
}

GhostState ghost_state(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
                       DeviceBatchNorm primary_bn, DeviceBatchNorm cheap_bn, const GhostSizes& sizes, bool relu,
                       bool batch_statistics) {
  const GhostSizes& s = sizes;
  const int64_t size = s.height * s.width, count = s.batch * size;
  const bool nhwc = is_nhwc(x);
  GhostState g{sizes,
               relu,
               nhwc,
               dense(x, nhwc).view({s.batch, s.in_channels, size}),
               dense(primary_weight).view({s.init, s.in_channels}),
               dense(cheap_weight).view({s.cheap, s.dw * s.dw}),
               at::Tensor(),
               std::move(primary_bn),
               std::move(cheap_bn)};
  const DType dtype = dtype_of(x);
  const cudaStream_t stream = current_stream();
  g.y1 = conv1x1(g.x, g.primary_weight, nhwc);
  at::Tensor moments;
  if (batch_statistics) {
    moments = moments_partials(count, s.init, x);
    check(cuda::launch_channel_moments(dtype, g.y1.data_ptr(), s.batch, s.init, size, nhwc, moments.data_ptr(),
                                       stream),
          "channel_moments");
  }
  finish_batch_norm(g.primary_bn, batch_statistics ? &moments : nullptr, count, dtype);
  if (batch_statistics) {  // the cheap convolution's moments read only the primary BatchNorm's folded map
    moments = moments_partials(count, s.cheap, x);
    check(cuda::launch_cheap_moments(g.args({nullptr, 0, 0, 0, true}), moments.data_ptr(), stream),
          "cheap_moments");
  }
  finish_batch_norm(g.cheap_bn, batch_statistics ? &moments : nullptr, count, dtype);
  return g;
}

GhostGrads ghost_backward(const GhostState& g, const at::Tensor& grad_out, const cuda::GateView& gate,
                          const at::Tensor& product, bool training) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, count = s.batch * size;
  const cudaStream_t stream = current_stream();
  const cuda::GhostArgs args = g.args(gate);
  void* product_data = product.defined() ? product.data_ptr() : nullptr;

  // The cheap branch: its BatchNorm's coefficients (from the batch in training), then dy2.
  at::Tensor cheap_sums;
  if (training) {
    cheap_sums = grad_sums_partials(count, s.cheap, g.x);
    check(cuda::launch_cheap_grad_sums(args, grad_out.data_ptr(), g.cheap_bn.mean.data_ptr<double>(),
                                       cheap_sums.data_ptr(), stream),
          "cheap_grad_sums");
  }
  const DeviceBatchNormGrad cheap = batch_norm_backward(g.cheap_bn, cheap_sums, count, training, g.x);
  at::Tensor dy2 =
      empty_full_resolution({s.batch, s.cheap, s.height, s.width}, g.x.options().dtype(acc_dtype(g.x)), g.nhwc);
  at::Tensor sums = grad_sums_partials(count, s.cheap, g.x);
  check(cuda::launch_cheap_backward(args, grad_out.data_ptr(), cheap.a.data_ptr(), cheap.b.data_ptr(),
                                    cheap.c.data_ptr(), g.cheap_bn.mean.data_ptr<double>(), dy2.data_ptr(),
                                    product_data, sums.data_ptr(), stream),
        "cheap_backward");
  GhostGrads grads;
  grads.cheap_bn = batch_norm_backward(g.cheap_bn, sums, count, training, g.x);
  at::Tensor taps = at::empty({cuda::reduce_chunks(count), s.cheap, s.dw * s.dw}, sums.options());
  check(cuda::launch_cheap_weight_grad(args, dy2.data_ptr(), taps.data_ptr<double>(), stream), "cheap_weight_grad");
  grads.cheap_weight = tap_grad(taps, g.x.scalar_type());

  // The primary branch: y1's gradient (of the BatchNorm output in training, of y1 itself in eval).
  const DeviceBatchNormGrad eval_primary = batch_norm_backward(g.primary_bn, at::Tensor(), count, false, g.x);
  const at::Tensor out_scale = training ? at::ones_like(eval_primary.a) : eval_primary.a;
  at::Tensor y1_grad = at::empty_like(g.y1);
  sums = grad_sums_partials(count, s.init, g.x);
  check(cuda::launch_primary_backward(args, grad_out.data_ptr(), dy2.data_ptr(), out_scale.data_ptr(),
                                      g.primary_bn.mean.data_ptr<double>(), y1_grad.data_ptr(), product_data,
                                      sums.data_ptr(), stream),
        "primary_backward");
  grads.primary_bn = batch_norm_backward(g.primary_bn, sums, count, training, g.x);
  if (training)
    check(cuda::launch_batch_norm_input_grad(args.dtype, y1_grad.data_ptr(), g.y1.data_ptr(),
                                             grads.primary_bn.a.data_ptr(), grads.primary_bn.b.data_ptr(),
                                             grads.primary_bn.c.data_ptr(), s.batch, s.init, size, g.nhwc, stream),
          "batch_norm_input_grad");
  grads.x = conv1x1(y1_grad, g.primary_weight.t(), g.nhwc);
  grads.primary_weight = conv1x1_weight_grad(y1_grad, g.x);
  return grads;
}

namespace {

constexpr const char* kForward = "ghostfused_C::ghost_concat_forward";
constexpr const char* kBackward = "ghostfused_C::ghost_concat_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_concat_forward(
    const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight, at::TensorList bn_weight,
    at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup,
    bool relu, bool training, std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const GhostSizes s = check_ghost_concat_arguments(kForward, x, primary_weight, cheap_weight, bn_weight, bn_bias,
    bn_mean, bn_var, bn_eps, oup, training && !sync.active());
  std::vector<DeviceBatchNorm> bns = device_batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync);
  const GhostState g = ghost_state(x, primary_weight, cheap_weight, bns[0], bns[1], s, relu, training);
  at::Tensor out = empty_output({s.batch, s.oup, s.height, s.width}, x.options(), memory_format_of(x));
  check(cuda::launch_ghost_write(g.args({nullptr, 0, 0, 0, true}), out.data_ptr(), current_stream()),
        "ghost_write");
  return {out, packed({g.primary_bn.mean, g.cheap_bn.mean}, x),
          packed({g.primary_bn.var, g.cheap_bn.var}, x), nothing_saved(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_concat_backward(
    const at::Tensor& grad_out, const at::Tensor& /*saved*/, const at::Tensor& x, const at::Tensor& primary_weight,
    const at::Tensor& cheap_weight, at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
    at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup, bool relu, bool training,
    std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const GhostSizes s = check_ghost_concat_arguments(kBackward, x, primary_weight, cheap_weight, bn_weight, bn_bias,
    bn_mean, bn_var, bn_eps, oup, training && !sync.active());
  check_grad_out(kBackward, grad_out, x, s.oup);
  std::vector<DeviceBatchNorm> bns = device_batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync);
  const GhostState g = ghost_state(x, primary_weight, cheap_weight, bns[0], bns[1], s, relu, false);
  const GhostGrads grads =
      ghost_backward(g, dense(grad_out, g.nhwc), {nullptr, 0, 0, 0, true}, at::Tensor(), training);
  return {grads.x.view(x.sizes()), grads.primary_weight.view(primary_weight.sizes()),
          grads.cheap_weight.view(cheap_weight.sizes()),
          packed({grads.primary_bn.weight_grad, grads.cheap_bn.weight_grad}, x),
          packed({grads.primary_bn.bias_grad, grads.cheap_bn.bias_grad}, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CUDA, m) {
  m.impl("ghost_concat_forward", &ghost_concat_forward);
  m.impl("ghost_concat_backward", &ghost_concat_backward);
}

}  // namespace ghostfused::cuda_glue
