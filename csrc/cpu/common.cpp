#include "common.h"

#include <ATen/ThreadLocalState.h>

namespace ghostfused::cpu {

at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor dense(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

at::Tensor as_output(const at::Tensor& out, const at::Tensor& x) {
  return out.to(x.scalar_type()).contiguous(memory_format_of(x));
}

namespace {

std::vector<double> host_vector(const at::Tensor& t) {
  const at::Tensor d = t.detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

}  // namespace

std::vector<BatchNorm> batch_norms(at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                   at::TensorList bn_var, at::ArrayRef<double> bn_eps) {
  std::vector<BatchNorm> out;
  for (size_t i = 0; i < bn_weight.size(); ++i)
    out.push_back({host_vector(bn_weight[i]), host_vector(bn_bias[i]), host_vector(bn_mean[i]),
                   host_vector(bn_var[i]), bn_eps[i]});
  return out;
}

void set_batch_statistics(BatchNorm& bn, const std::vector<Moments>& moments) {
  for (size_t c = 0; c < moments.size(); ++c) {
    bn.mean[c] = moments_mean(moments[c]);
    bn.var[c] = moments_biased_var(moments[c]);
  }
}

at::Tensor packed(const std::vector<std::vector<double>>& values, const at::Tensor& x) {
  std::vector<double> all;
  for (const auto& v : values) all.insert(all.end(), v.begin(), v.end());
  at::Tensor out = at::empty({static_cast<int64_t>(all.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(all.begin(), all.end(), out.data_ptr<double>());
  return out.to(x.device(), stats_dtype(x));
}

std::tuple<at::Tensor, at::Tensor> packed_statistics(const std::vector<const BatchNorm*>& bns,
                                                     const at::Tensor& x) {
  std::vector<std::vector<double>> means, vars;
  for (const BatchNorm* bn : bns) {
    means.push_back(bn->mean);
    vars.push_back(bn->var);
  }
  return {packed(means, x), packed(vars, x)};
}

void batch_norm_param_grads(const BatchNorm& bn, const std::vector<GradSums>& sums, std::vector<double>& weight,
                            std::vector<double>& bias) {
  weight.resize(sums.size());
  bias.resize(sums.size());
  for (size_t c = 0; c < sums.size(); ++c) {
    weight[c] = batch_norm_weight_grad(bn.var[c], bn.eps, sums[c]);
    bias[c] = sums[c].dy;
  }
}

std::vector<Moments> combine_planes(const std::vector<Moments>& partials, int64_t batch, int64_t channels) {
  std::vector<Moments> out(channels, Moments{0, 0, 0});
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c) out[c] = combine(out[c], partials[n * channels + c]);
  return out;
}

std::vector<GradSums> combine_planes(const std::vector<GradSums>& partials, int64_t batch, int64_t channels) {
  std::vector<GradSums> out(channels, GradSums{0, 0});
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c) out[c] = out[c] + partials[n * channels + c];
  return out;
}

at::Tensor combine_tap_partials(const std::vector<double>& partials, int64_t batch, int64_t channels, int64_t taps,
                                const at::TensorOptions& options) {
  at::Tensor out = at::zeros({channels, taps}, at::TensorOptions().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t i = 0; i < channels * taps; ++i) dst[i] += partials[n * channels * taps + i];
  return out.to(options);
}

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight) {
  return at::matmul(weight, x);
}

at::Tensor conv1x1_weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  // Chunks of at most chunk_size positions of one sample; the chunking depends on the shapes only.
  constexpr int64_t chunk_size = 4096;
  const int64_t batch = grad.size(0), out_channels = grad.size(1), in_channels = input.size(1);
  const int64_t size = grad.size(2);
  const int64_t per_sample = (size + chunk_size - 1) / chunk_size;
  const int64_t chunks = batch * per_sample;
  at::Tensor partials = at::zeros({std::max<int64_t>(chunks, 1), out_channels, in_channels}, grad.options());
  // Each chunk's GEMM runs single-threaded inside this parallel region (OpenMP does not nest), so its summation
  // order is fixed; the region is entered even for one chunk so that the GEMM never runs multi-threaded.
  // The caller's thread-local state (the dispatch keys excluded below autograd) goes with the work.
  const int threads = std::max(1, at::get_num_threads());
  const at::ThreadLocalState state;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const at::ThreadLocalStateGuard guard(state);
    const int64_t n = chunk / per_sample, begin = (chunk % per_sample) * chunk_size;
    const int64_t length = std::min(chunk_size, size - begin);
    at::Tensor out = partials[chunk];
    at::mm_out(out, grad[n].narrow(1, begin, length), input[n].narrow(1, begin, length).t());
  }
  const at::Tensor ordered = partials.to(at::kDouble).contiguous();
  at::Tensor out = at::zeros({out_channels, in_channels}, ordered.options());
  const double* src = ordered.data_ptr<double>();
  double* dst = out.data_ptr<double>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < out_channels * in_channels; ++i) dst[i] += src[chunk * out_channels * in_channels + i];
  return out.to(grad.scalar_type());
}

}  // namespace ghostfused::cpu
