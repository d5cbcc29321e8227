#include "glue.h"

#include "cpu/block_cache.h"
#include "ghostfused/depthwise.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>

namespace ghostfused {

bool poison_outputs() {
  static const bool poison = [] {
    const char* value = std::getenv("GHOSTFUSED_POISON_OUTPUTS");
    return value != nullptr && std::string(value) == "1";
  }();
  return poison;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat memory_format) {
  at::Tensor out = options.device().is_cpu() ? cpu::cached_empty(sizes, options, memory_format)
                                             : at::empty(sizes, options.memory_format(memory_format));
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

at::MemoryFormat memory_format_of(const at::Tensor& x) {
  const bool channels_last = x.size(1) > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// The sum of t over the processes of the group named `group` (a new tensor). The op takes the group as `Any` (a
// name or a ProcessGroup object).
at::Tensor all_reduce_sum(const at::Tensor& t, const std::string& group) {
  static const auto all_reduce = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("_c10d_functional::all_reduce", "")
                                     .typed<at::Tensor(const at::Tensor&, std::string, const c10::IValue&)>();
  static const auto wait = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("_c10d_functional::wait_tensor", "")
                               .typed<at::Tensor(const at::Tensor&)>();
  return wait.call(all_reduce.call(t.contiguous(), "sum", c10::IValue(group)));
}

}  // namespace

SyncGroup::SyncGroup(const std::optional<c10::string_view>& name)
    : name_(name.has_value() ? std::string(*name) : std::string()) {}

void SyncGroup::moments(at::Tensor& mean, at::Tensor& var, double count) const {
  if (!active()) return;
  const int64_t channels = mean.size(0);
  const at::Tensor sums = all_reduce_sum(at::cat({mean * count, at::full({1}, count, mean.options())}), name_);
  const double total = sums[channels].item<double>();
  if (total == 0) {  // no process has values: the statistics of an empty batch (never used)
    mean.zero_();
    var.fill_(1);
    return;
  }
  const at::Tensor group_mean = sums.narrow(0, 0, channels) / total;
  const at::Tensor m2 = all_reduce_sum((var + (mean - group_mean).square()) * count, name_);
  mean.copy_(group_mean);
  var.copy_(m2 / total);
}

double SyncGroup::grad_sums(at::Tensor& sums, double count) const {
  if (!active()) return count;
  const int64_t size = sums.numel();
  const at::Tensor total = all_reduce_sum(at::cat({sums.reshape(-1), at::full({1}, count, sums.options())}), name_);
  sums.copy_(total.narrow(0, 0, size).view(sums.sizes()));
  return total[size].item<double>();
}

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              ": all tensors must share one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

}  // namespace

void check_input(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": ", name, " must have H >= 1 and W >= 1, got shape ",
              x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
}

GhostSizes check_ghost_arguments(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                                 const at::Tensor& cheap_weight, int64_t oup) {
  check_input(op, x);
  check_like(op, primary_weight, "primary_weight", x);
  check_like(op, cheap_weight, "cheap_weight", x);
  TORCH_CHECK(primary_weight.dim() == 4 && primary_weight.size(0) >= 1, op,
              ": primary_weight must be [init, Cin, 1, 1] with init >= 1, got shape ", primary_weight.sizes());
  const int64_t init = primary_weight.size(0);
  check_shape(op, primary_weight, "primary_weight", {init, x.size(1), 1, 1});
  TORCH_CHECK(cheap_weight.dim() == 4, op, ": cheap_weight must be 4-D [new, 1, dw, dw], got shape ",
              cheap_weight.sizes());
  const int64_t cheap = cheap_weight.size(0), dw = cheap_weight.size(3);
  TORCH_CHECK(cheap >= 1 && cheap % init == 0 && dw % 2 == 1, op,
              ": cheap_weight must have shape [new, 1, dw, dw] with new a multiple of init=", init,
              " and dw odd, got ", cheap_weight.sizes());
  check_shape(op, cheap_weight, "cheap_weight", {cheap, 1, dw, dw});
  TORCH_CHECK(init <= oup && oup <= init + cheap, op, ": oup must be in [", init, ", ", init + cheap,
              "] (primary ", init, " + cheap ", cheap, " channels), got ", oup);
  return {x.size(0), x.size(1), x.size(2), x.size(3), init, cheap, cheap / init, oup, dw};
}

DfcSizes check_dfc_arguments(const char* op, const at::Tensor& x, const at::Tensor& conv_weight,
                             const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight,
                             int64_t channels, const std::string& upsample) {
  check_input(op, x);
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, op,
              ": x must have H >= 2 and W >= 2 for the DFC attention's 2x2 pooling, got H=", x.size(2),
              ", W=", x.size(3));
  check_like(op, conv_weight, "conv_weight", x);
  check_like(op, horizontal_weight, "horizontal_weight", x);
  check_like(op, vertical_weight, "vertical_weight", x);
  check_shape(op, conv_weight, "conv_weight", {channels, x.size(1), 1, 1});
  const int64_t k = horizontal_weight.dim() == 4 ? horizontal_weight.size(3) : -1;
  TORCH_CHECK(k >= 1 && k % 2 == 1, op, ": horizontal_weight must have shape [C, 1, 1, K] with K odd, got ",
              horizontal_weight.sizes());
  check_shape(op, horizontal_weight, "horizontal_weight", {channels, 1, 1, k});
  check_shape(op, vertical_weight, "vertical_weight", {channels, 1, k, 1});
  TORCH_CHECK(upsample == "nearest" || upsample == "bilinear", op,
              ": upsample must be 'nearest' or 'bilinear', got '", upsample, "'");
  return {channels, k, x.size(2) / 2, x.size(3) / 2, upsample == "nearest"};
}

void check_features(const char* op, const at::Tensor& features, const at::Tensor& x, int64_t channels) {
  check_input(op, features, "features");
  check_like(op, features, "features", x);
  check_shape(op, features, "features", {x.size(0), channels, x.size(2), x.size(3)});
}

void check_batch_norms(const char* op, const at::Tensor& x, at::TensorList bn_weight, at::TensorList bn_bias,
                       at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                       const std::vector<int64_t>& channels) {
  const size_t count = channels.size();
  const std::pair<const char*, at::TensorList> lists[] = {
      {"bn_weight", bn_weight}, {"bn_bias", bn_bias}, {"bn_mean", bn_mean}, {"bn_var", bn_var}};
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(list.size() == count, op, ": ", name, " must hold ", count, " tensors (one per BatchNorm), got ",
                list.size());
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == x.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but x is on ",
                  x.device(), ": all tensors must share one device");
      TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, "[", i, "] must be floating point, got ",
                  t.scalar_type());
      TORCH_CHECK(t.dim() == 1 && t.size(0) == channels[i], op, ": ", name, "[", i, "] must have shape [",
                  channels[i], "], got ", t.sizes());
    }
  }
  TORCH_CHECK(bn_eps.size() == count, op, ": bn_eps must hold ", count, " values (one per BatchNorm), got ",
              bn_eps.size());
  for (size_t i = 0; i < count; ++i)
    TORCH_CHECK(bn_eps[i] > 0, op, ": bn_eps[", i, "] must be positive, got ", bn_eps[i]);
}

void check_training_count(const char* op, int64_t count, bool training) {
  TORCH_CHECK(!training || count != 1, op,
              ": expected more than 1 value per channel when training (N * H * W == 1 for a BatchNorm)");
}

void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, int64_t channels) {
  check_grad_out(op, grad_out, x, {x.size(0), channels, x.size(2), x.size(3)});
}

void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef sizes) {
  check_input(op, grad_out, "grad_out");
  check_like(op, grad_out, "grad_out", x);
  check_shape(op, grad_out, "grad_out", sizes);
}

GhostSizes check_ghost_concat_arguments(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                                        const at::Tensor& cheap_weight, at::TensorList bn_weight,
                                        at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
                                        at::ArrayRef<double> bn_eps, int64_t oup, bool training) {
  const GhostSizes s = check_ghost_arguments(op, x, primary_weight, cheap_weight, oup);
  check_batch_norms(op, x, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, {s.init, s.cheap});
  check_training_count(op, s.batch * s.height * s.width, training);
  return s;
}

DfcSizes check_dfc_attention_arguments(const char* op, const at::Tensor& x, const at::Tensor& features,
                                       const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                                       const at::Tensor& vertical_weight, at::TensorList bn_weight,
                                       at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
                                       at::ArrayRef<double> bn_eps, const std::string& upsample, bool training) {
  check_input(op, x);
  check_input(op, features, "features");
  const int64_t channels = features.size(1);
  const DfcSizes s = check_dfc_arguments(op, x, conv_weight, horizontal_weight, vertical_weight, channels, upsample);
  check_features(op, features, x, channels);
  check_batch_norms(op, x, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, {channels, channels, channels});
  check_training_count(op, x.size(0) * s.pooled_h * s.pooled_w, training);
  return s;
}

GhostAttnSizes check_ghost_attn_arguments(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                                          const at::Tensor& cheap_weight, const at::Tensor& conv_weight,
                                          const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight,
                                          at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                          at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup,
                                          const std::string& upsample, bool training) {
  const GhostSizes ghost = check_ghost_arguments(op, x, primary_weight, cheap_weight, oup);
  const DfcSizes dfc = check_dfc_arguments(op, x, conv_weight, horizontal_weight, vertical_weight, oup, upsample);
  check_batch_norms(op, x, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, {ghost.init, ghost.cheap, oup, oup, oup});
  check_training_count(op, ghost.batch * dfc.pooled_h * dfc.pooled_w, training);
  return {ghost, dfc};
}

DepthwiseSizes check_depthwise_bn_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                            at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                            at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t stride,
                                            bool training) {
  check_input(op, x);
  check_like(op, weight, "weight", x);
  const int64_t channels = x.size(1), k = weight.dim() == 4 ? weight.size(3) : -1;
  TORCH_CHECK(k >= 1 && k % 2 == 1, op, ": weight must have shape [C, 1, k, k] with k odd, got ", weight.sizes());
  check_shape(op, weight, "weight", {channels, 1, k, k});
  TORCH_CHECK(stride >= 1, op, ": stride must be positive, got ", stride);
  check_batch_norms(op, x, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, {channels});
  const int kernel = static_cast<int>(k);
  const int64_t out_h = strided_output_size(x.size(2), kernel, stride);
  const int64_t out_w = strided_output_size(x.size(3), kernel, stride);
  check_training_count(op, x.size(0) * out_h * out_w, training);
  return {x.size(0), channels, x.size(2), x.size(3), kernel, stride, out_h, out_w};
}

StemSizes check_stem_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::TensorList bn_weight, at::TensorList bn_bias,
                               at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                               int64_t stride) {
  check_input(op, x);
  check_like(op, weight, "weight", x);
  const int64_t out_channels = weight.dim() == 4 ? weight.size(0) : -1, k = weight.dim() == 4 ? weight.size(3) : -1;
  TORCH_CHECK(out_channels >= 1 && k >= 1 && k % 2 == 1, op,
              ": weight must have shape [Cout, Cin, k, k] with Cout >= 1 and k odd, got ", weight.sizes());
  check_shape(op, weight, "weight", {out_channels, x.size(1), k, k});
  if (bias.has_value() && bias->defined()) {
    check_like(op, *bias, "bias", x);
    check_shape(op, *bias, "bias", {out_channels});
  }
  TORCH_CHECK(stride >= 1, op, ": stride must be positive, got ", stride);
  check_batch_norms(op, x, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, {out_channels});
  const int kernel = static_cast<int>(k);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": x must have H >= 1 and W >= 1, got shape ", x.sizes());
  return {x.size(0), x.size(1), x.size(2), x.size(3), out_channels, kernel, stride,
          strided_output_size(x.size(2), kernel, stride), strided_output_size(x.size(3), kernel, stride)};
}

}  // namespace ghostfused
