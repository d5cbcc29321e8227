#include "common_glue.h"

#include <ATen/cuda/CUDAContext.h>

namespace ghostfused::cuda_glue {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, "ghostfused cuda kernels: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "ghostfused cuda kernel ", what, " failed: ", cudaGetErrorString(error));
}

cudaStream_t current_stream() {
  return at::cuda::getCurrentCUDAStream().stream();
}

bool is_nhwc(const at::Tensor& x) {
  return memory_format_of(x) == at::MemoryFormat::ChannelsLast;
}

at::Tensor dense(const at::Tensor& t, bool nhwc) {
  return t.detach().contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::Tensor empty_full_resolution(at::IntArrayRef sizes, const at::TensorOptions& options, bool nhwc) {
  return at::empty(sizes, options.memory_format(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

std::vector<DeviceBatchNorm> device_batch_norms(at::TensorList bn_weight, at::TensorList bn_bias,
                                                at::TensorList bn_mean, at::TensorList bn_var,
                                                at::ArrayRef<double> bn_eps, const SyncGroup& sync) {
  std::vector<DeviceBatchNorm> out;
  auto as_double = [](const at::Tensor& t) { return t.detach().to(at::kDouble).contiguous(); };
  for (size_t i = 0; i < bn_weight.size(); ++i)
    out.push_back({as_double(bn_weight[i]), as_double(bn_bias[i]), as_double(bn_mean[i]).clone(),
                   as_double(bn_var[i]).clone(), bn_eps[i], at::Tensor(), at::Tensor(), sync});
  return out;
}

at::Tensor moments_partials(int64_t count, int64_t channels, const at::Tensor& like) {
  return at::empty({cuda::reduce_chunks(count), channels, 3}, like.options().dtype(at::kDouble));
}

at::Tensor grad_sums_partials(int64_t count, int64_t channels, const at::Tensor& like) {
  return at::empty({cuda::reduce_chunks(count), channels, 2}, like.options().dtype(at::kDouble));
}

void finish_batch_norm(DeviceBatchNorm& bn, const at::Tensor* moments, int64_t count, DType dtype) {
  const cudaStream_t stream = current_stream();
  const int64_t channels = bn.weight.size(0);
  if (moments != nullptr) {
    check(cuda::launch_finish_moments(moments->data_ptr(), cuda::reduce_chunks(count), channels,
                                      bn.mean.data_ptr<double>(), bn.var.data_ptr<double>(), stream),
          "finish_moments");
    bn.sync.moments(bn.mean, bn.var, static_cast<double>(count));
  }
  const at::ScalarType acc = dtype == DType::Float64 ? at::kDouble : at::kFloat;
  bn.scale = at::empty({channels}, bn.weight.options().dtype(acc));
  bn.shift = at::empty_like(bn.scale);
  check(cuda::launch_fold_batch_norm(dtype, bn.weight.data_ptr<double>(), bn.bias.data_ptr<double>(),
                                     bn.mean.data_ptr<double>(), bn.var.data_ptr<double>(), bn.eps, channels,
                                     bn.scale.data_ptr(), bn.shift.data_ptr(), stream),
        "fold_batch_norm");
}

namespace {

DeviceBatchNormGrad launch_backward(const DeviceBatchNorm& bn, const at::Tensor& sums, double count, bool training,
                                    const at::Tensor& x) {
  const int64_t channels = bn.weight.size(0);
  DeviceBatchNormGrad g;
  g.a = at::empty({channels}, bn.weight.options().dtype(acc_dtype(x)));
  g.b = at::empty_like(g.a);
  g.c = at::empty_like(g.a);
  g.weight_grad = at::empty_like(bn.weight);
  g.bias_grad = at::empty_like(bn.weight);
  check(cuda::launch_batch_norm_backward(dtype_of(x), bn.weight.data_ptr<double>(), bn.mean.data_ptr<double>(),
                                         bn.var.data_ptr<double>(), bn.eps, sums.data_ptr(), sums.size(0), channels,
                                         count, training, g.a.data_ptr(), g.b.data_ptr(), g.c.data_ptr(),
                                         g.weight_grad.data_ptr<double>(), g.bias_grad.data_ptr<double>(),
                                         current_stream()),
        "batch_norm_backward");
  return g;
}

}  // namespace

DeviceBatchNormGrad batch_norm_backward(const DeviceBatchNorm& bn, const at::Tensor& partials, int64_t count,
                                        bool training, const at::Tensor& x) {
  const int64_t channels = bn.weight.size(0);
  const at::Tensor sums = partials.defined() ? partials : at::zeros({1, channels, 2}, bn.weight.options());
  DeviceBatchNormGrad g = launch_backward(bn, sums, static_cast<double>(count), training, x);
  if (training && bn.sync.active()) {  // the coefficients again, from the group's sums
    at::Tensor group_sums = sums.sum(0, /*keepdim=*/true);
    const double group_count = bn.sync.grad_sums(group_sums, static_cast<double>(count));
    const DeviceBatchNormGrad group = launch_backward(bn, group_sums, group_count, training, x);
    g.a = group.a;
    g.b = group.b;
    g.c = group.c;
  }
  return g;
}

at::Tensor nothing_saved(const at::Tensor& x) {
  return at::empty({0}, x.options().dtype(stats_dtype(x)));
}

at::Tensor packed(const std::vector<at::Tensor>& values, const at::Tensor& x) {
  return at::cat(values).to(stats_dtype(x));
}

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight, bool nhwc) {
  if (nhwc) return at::matmul(x.transpose(1, 2), weight.t()).contiguous().transpose(1, 2);
  return at::matmul(weight, x).contiguous();
}

at::Tensor conv1x1_weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  const at::Tensor grad_rows = grad.transpose(1, 2), input_rows = input.transpose(1, 2);
  if (grad_rows.is_contiguous() && input_rows.is_contiguous())
    return at::mm(grad_rows.reshape({-1, grad.size(1)}).t(), input_rows.reshape({-1, input.size(1)}));
  if (grad.size(0) == 1) return at::mm(grad[0], input[0].t());
  return at::bmm(grad, input.transpose(1, 2)).to(acc_dtype(grad)).sum(0).to(grad.scalar_type());
}

at::Tensor tap_grad(const at::Tensor& partials, at::ScalarType dtype) {
  return partials.sum(0).to(dtype);
}

}  // namespace ghostfused::cuda_glue
