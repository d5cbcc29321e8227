// dfc_attention on the GPU: argument checks, pooling, the 1x1 convolution (cuBLAS), the quarter-resolution gate
// and the gated write.
#include "dfc_attention_glue.h"

#include <torch/library.h>

namespace ghostfused::cuda_glue {

cuda::GateView DfcState::view() const {
  return {gate.data_ptr(), shape.channels, shape.h, shape.w, shape.nearest};
}

DfcState dfc_state(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                   const at::Tensor& vertical_weight, std::vector<DeviceBatchNorm> bns, const DfcSizes& sizes,
                   bool batch_statistics) {
  const int64_t channels = sizes.channels, k = sizes.kernel, size = sizes.pooled_h * sizes.pooled_w;
  DfcState d;
  const bool nhwc = is_nhwc(x);
  d.shape = {x.size(0), x.size(1), x.size(2), x.size(3), channels, sizes.pooled_h, sizes.pooled_w, k, sizes.nearest,
             nhwc};
  d.conv_weight = dense(conv_weight).view({channels, x.size(1)});
  d.horizontal_weight = dense(horizontal_weight).view({channels, k});
  d.vertical_weight = dense(vertical_weight).view({channels, k});
  d.bns = std::move(bns);
  const DType dtype = dtype_of(x);
  const cudaStream_t stream = current_stream();
  const int64_t count = d.shape.batch * size;
  const at::Tensor xd = dense(x, nhwc);
  d.pooled = nhwc ? at::empty({d.shape.batch, size, d.shape.in_channels}, xd.options()).transpose(1, 2)
                  : at::empty({d.shape.batch, d.shape.in_channels, size}, xd.options());
  check(cuda::launch_average_pool(dtype, d.shape, xd.data_ptr(), d.pooled.data_ptr(), stream), "average_pool");
  d.z0 = conv1x1(d.pooled, d.conv_weight, false);
  const at::TensorOptions acc = xd.options().dtype(acc_dtype(xd));
  const DType acc_type = acc_dtype(xd) == at::kDouble ? DType::Float64 : DType::Float32;
  // Each stage: the statistics of its input (batch), the folded map, the next convolution.
  auto finish = [&](int index, const at::Tensor& z, DType z_type) {
    at::Tensor moments;
    if (batch_statistics) {
      moments = moments_partials(count, channels, xd);
      check(cuda::launch_channel_moments(z_type, z.data_ptr(), d.shape.batch, channels, size, false,
                                         moments.data_ptr(), stream),
            "channel_moments");
    }
    finish_batch_norm(d.bns[index], batch_statistics ? &moments : nullptr, count, dtype);
  };
  finish(0, d.z0, dtype);
  d.z1 = at::empty({d.shape.batch, channels, size}, acc);
  check(cuda::launch_dfc_conv(dtype, d.shape, true, d.z0.data_ptr(), true, d.bns[0].scale.data_ptr(),
                              d.bns[0].shift.data_ptr(), d.horizontal_weight.data_ptr(), d.z1.data_ptr(), stream),
        "dfc_conv");
  finish(1, d.z1, acc_type);
  d.z2 = at::empty_like(d.z1);
  check(cuda::launch_dfc_conv(dtype, d.shape, false, d.z1.data_ptr(), false, d.bns[1].scale.data_ptr(),
                              d.bns[1].shift.data_ptr(), d.vertical_weight.data_ptr(), d.z2.data_ptr(), stream),
        "dfc_conv");
  finish(2, d.z2, acc_type);
  d.gate = at::empty_like(d.z1);
  check(cuda::launch_dfc_sigmoid(dtype, d.shape, d.z2.data_ptr(), d.bns[2].scale.data_ptr(),
                                 d.bns[2].shift.data_ptr(), d.gate.data_ptr(), stream),
        "dfc_sigmoid");
  return d;
}

DfcGrads dfc_backward(const DfcState& d, const at::Tensor& product, bool training) {
  const cuda::DfcShape& s = d.shape;
  const DType dtype = dtype_of(d.pooled);
  const cudaStream_t stream = current_stream();
  const int64_t count = s.batch * s.h * s.w;
  at::Tensor dgate = at::empty_like(d.gate);
  check(cuda::launch_gate_grad(dtype, s, product.data_ptr(), dgate.data_ptr(), stream), "gate_grad");
  at::Tensor du = at::empty_like(d.gate);
  check(cuda::launch_sigmoid_backward(dtype, s, dgate.data_ptr(), d.gate.data_ptr(), du.data_ptr(), stream),
        "sigmoid_backward");
  DfcGrads grads;
  grads.bns.resize(3);
  // Stage by stage backwards: the BatchNorm (sums, coefficients), then the convolution (weight, input gradient).
  auto batch_norm = [&](int index, const at::Tensor& z, bool z_is_dtype) {
    at::Tensor sums = grad_sums_partials(count, s.channels, d.pooled);
    check(cuda::launch_dfc_grad_sums(dtype, s, du.data_ptr(), z.data_ptr(), z_is_dtype,
                                     d.bns[index].mean.data_ptr<double>(), sums.data_ptr(), stream),
          "dfc_grad_sums");
    grads.bns[index] = batch_norm_backward(d.bns[index], sums, count, training, d.pooled);
    at::Tensor dz = at::empty_like(d.gate);
    const DeviceBatchNormGrad& k = grads.bns[index];
    check(cuda::launch_dfc_input_grad(dtype, s, du.data_ptr(), z.data_ptr(), z_is_dtype, k.a.data_ptr(),
                                      k.b.data_ptr(), k.c.data_ptr(), dz.data_ptr(), stream),
          "dfc_input_grad");
    return dz;
  };
  auto conv = [&](bool horizontal, const at::Tensor& dz, const at::Tensor& z_in, bool in_is_dtype, int index,
                  const at::Tensor& taps) {
    at::Tensor partials = at::empty({cuda::reduce_chunks(count), s.channels, s.k}, d.bns[0].weight.options());
    at::Tensor du_in = at::empty_like(d.gate);
    check(cuda::launch_dfc_conv_backward(dtype, s, horizontal, dz.data_ptr(), z_in.data_ptr(), in_is_dtype,
                                         d.bns[index].scale.data_ptr(), d.bns[index].shift.data_ptr(),
                                         taps.data_ptr(), partials.data_ptr<double>(), du_in.data_ptr(), stream),
          "dfc_conv_backward");
    du = du_in;
    return tap_grad(partials, d.pooled.scalar_type());
  };
  const at::Tensor dz2 = batch_norm(2, d.z2, false);
  grads.vertical_weight = conv(false, dz2, d.z1, false, 1, d.vertical_weight);
  const at::Tensor dz1 = batch_norm(1, d.z1, false);
  grads.horizontal_weight = conv(true, dz1, d.z0, true, 0, d.horizontal_weight);
  const at::Tensor dz0 = batch_norm(0, d.z0, true).to(d.pooled.scalar_type());
  grads.pooled = conv1x1(dz0, d.conv_weight.t(), s.nhwc);
  grads.conv_weight = conv1x1_weight_grad(dz0, d.pooled);
  return grads;
}

void pool_backward(const DfcState& d, const at::Tensor& pooled_grad, at::Tensor& dx, bool accumulate) {
  check(cuda::launch_pool_backward(dtype_of(d.pooled), d.shape, pooled_grad.data_ptr(), dx.data_ptr(), accumulate,
                                   current_stream()),
        "pool_backward");
}

namespace {

constexpr const char* kForward = "ghostfused_C::dfc_attention_forward";
constexpr const char* kBackward = "ghostfused_C::dfc_attention_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dfc_attention_forward(
    const at::Tensor& x, const at::Tensor& features, const at::Tensor& conv_weight,
    const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight, at::TensorList bn_weight,
    at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
    c10::string_view upsample, bool training, std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const DfcSizes s = check_dfc_attention_arguments(kForward, x, features, conv_weight, horizontal_weight,
    vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, std::string(upsample), training && !sync.active());
  const DfcState d = dfc_state(x, conv_weight, horizontal_weight, vertical_weight,
                               device_batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync), s, training);
  const at::Tensor feats = dense(features, d.shape.nhwc);
  at::Tensor out = empty_output(feats.sizes(), feats.options(), memory_format_of(x));
  check(cuda::launch_gate_product(dtype_of(x), d.shape, feats.data_ptr(), d.gate.data_ptr(), out.data_ptr(),
                                  current_stream()),
        "gate_product");
  return {out, packed({d.bns[0].mean, d.bns[1].mean, d.bns[2].mean}, x),
          packed({d.bns[0].var, d.bns[1].var, d.bns[2].var}, x), nothing_saved(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dfc_attention_backward(const at::Tensor& grad_out, const at::Tensor& /*saved*/, const at::Tensor& x,
                       const at::Tensor& features, const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                       const at::Tensor& vertical_weight, at::TensorList bn_weight, at::TensorList bn_bias,
                       at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                       c10::string_view upsample, bool training, std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const DfcSizes s = check_dfc_attention_arguments(kBackward, x, features, conv_weight, horizontal_weight,
    vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, std::string(upsample), training && !sync.active());
  check_grad_out(kBackward, grad_out, x, s.channels);
  const DfcState d = dfc_state(x, conv_weight, horizontal_weight, vertical_weight,
                               device_batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync), s, false);
  const at::Tensor feats = dense(features, d.shape.nhwc), grad = dense(grad_out, d.shape.nhwc);
  at::Tensor dfeatures = empty_output(feats.sizes(), feats.options(), memory_format_of(x));
  at::Tensor product = empty_full_resolution(feats.sizes(), feats.options().dtype(acc_dtype(feats)), d.shape.nhwc);
  check(cuda::launch_gate_product_backward(dtype_of(x), d.shape, grad.data_ptr(), feats.data_ptr(),
                                           d.gate.data_ptr(), dfeatures.data_ptr(), product.data_ptr(),
                                           current_stream()),
        "gate_product_backward");
  const DfcGrads grads = dfc_backward(d, product, training);
  at::Tensor dx = empty_output(x.sizes(), feats.options(), memory_format_of(x));
  pool_backward(d, grads.pooled, dx, false);
  std::vector<at::Tensor> weight_grads, bias_grads;
  for (const DeviceBatchNormGrad& g : grads.bns) {
    weight_grads.push_back(g.weight_grad);
    bias_grads.push_back(g.bias_grad);
  }
  return {dx,
          dfeatures,
          grads.conv_weight.view(conv_weight.sizes()),
          grads.horizontal_weight.view(horizontal_weight.sizes()),
          grads.vertical_weight.view(vertical_weight.sizes()),
          packed(weight_grads, x),
          packed(bias_grads, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CUDA, m) {
  m.impl("dfc_attention_forward", &dfc_attention_forward);
  m.impl("dfc_attention_backward", &dfc_attention_backward);
}

}  // namespace ghostfused::cuda_glue
