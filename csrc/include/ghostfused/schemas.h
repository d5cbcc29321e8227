// The arguments of each fused op's schema, shared by the kernel registrations. They must equal ARGUMENTS in
// ghostfused/ops/<op>.py (tests/test_extension.py checks it). Beside each, the C++ types the dispatcher passes those
// arguments as (Tensor: const at::Tensor&, Tensor[]: at::TensorList, float[]: at::ArrayRef<double>, int: int64_t,
// str: c10::string_view, str?: std::optional<c10::string_view>): the kernels' parameters after grad_out and saved
// for a backward; the Python entry points of csrc/ops.cpp call the kernels with them (the dispatcher checks them
// against the schema when the extension loads).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#define GHOSTFUSED_GHOST_CONCAT_ARGS                                                                   \
  "Tensor x, Tensor primary_weight, Tensor cheap_weight, Tensor[] bn_weight, Tensor[] bn_bias, "      \
  "Tensor[] bn_mean, Tensor[] bn_var, float[] bn_eps, int oup, bool relu, bool training, str? sync_group"

#define GHOSTFUSED_GHOST_CONCAT_TYPES \
  const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, \
  at::TensorList, at::ArrayRef<double>, int64_t, bool, bool, std::optional<c10::string_view>

#define GHOSTFUSED_DFC_ATTENTION_ARGS                                                                  \
  "Tensor x, Tensor features, Tensor conv_weight, Tensor horizontal_weight, Tensor vertical_weight, " \
  "Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, float[] bn_eps, "         \
  "str upsample, bool training, str? sync_group"

#define GHOSTFUSED_DFC_ATTENTION_TYPES \
  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, \
  at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::ArrayRef<double>, c10::string_view, \
  bool, std::optional<c10::string_view>

#define GHOSTFUSED_GHOST_ATTN_ARGS                                                                     \
  "Tensor x, Tensor primary_weight, Tensor cheap_weight, Tensor conv_weight, Tensor horizontal_weight, " \
  "Tensor vertical_weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, "  \
  "float[] bn_eps, int oup, bool relu, str upsample, bool training, str? sync_group"

#define GHOSTFUSED_GHOST_ATTN_TYPES \
  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,          \
  const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::ArrayRef<double>, \
  int64_t, bool, c10::string_view, bool, std::optional<c10::string_view>

#define GHOSTFUSED_DEPTHWISE_BN_ARGS                                                                   \
  "Tensor x, Tensor weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, " \
  "float[] bn_eps, int stride, bool training, str? sync_group"

#define GHOSTFUSED_DEPTHWISE_BN_TYPES \
  const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList, \
  at::ArrayRef<double>, int64_t, bool, std::optional<c10::string_view>
