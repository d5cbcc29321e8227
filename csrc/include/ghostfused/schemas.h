// The arguments of each fused op's schema, shared by the kernel registrations. They must equal ARGUMENTS in
// ghostfused/ops/<op>.py (tests/test_extension.py checks it).
#pragma once

#define GHOSTFUSED_GHOST_CONCAT_ARGS                                                                   \
  "Tensor x, Tensor primary_weight, Tensor cheap_weight, Tensor[] bn_weight, Tensor[] bn_bias, "      \
  "Tensor[] bn_mean, Tensor[] bn_var, float[] bn_eps, int oup, bool relu, bool training, str? sync_group"

#define GHOSTFUSED_DFC_ATTENTION_ARGS                                                                  \
  "Tensor x, Tensor features, Tensor conv_weight, Tensor horizontal_weight, Tensor vertical_weight, " \
  "Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, float[] bn_eps, "         \
  "str upsample, bool training, str? sync_group"

#define GHOSTFUSED_GHOST_ATTN_ARGS                                                                     \
  "Tensor x, Tensor primary_weight, Tensor cheap_weight, Tensor conv_weight, Tensor horizontal_weight, " \
  "Tensor vertical_weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, "  \
  "float[] bn_eps, int oup, bool relu, str upsample, bool training, str? sync_group"

#define GHOSTFUSED_DEPTHWISE_BN_ARGS                                                                   \
  "Tensor x, Tensor weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, " \
  "float[] bn_eps, int stride, bool training, str? sync_group"
