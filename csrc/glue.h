// Torch-side helpers shared by the CPU kernels (csrc/cpu) and the CUDA glue (csrc/cuda/*_glue.cpp): argument
// checks with clear messages (every kernel runs them before touching data) and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace ghostfused {

// Outputs are NaN-filled when GHOSTFUSED_POISON_OUTPUTS=1 (read once per process), so that an element a kernel
// forgets to write fails the comparison with the reference.
bool poison_outputs();

// An uninitialised (or NaN-poisoned) dense tensor for a kernel to fill.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat memory_format = at::MemoryFormat::Contiguous);

// The layout every op writes for input x: channels_last when x is, contiguous otherwise
// (ghostfused.reference.memory_format_of).
at::MemoryFormat memory_format_of(const at::Tensor& x);

// The dtype of BatchNorm statistics and their gradients: float64 for float64 inputs, float32 otherwise.
at::ScalarType stats_dtype(const at::Tensor& x);

// The torch.distributed process group over whose whole batch training BatchNorms normalise (nn.SyncBatchNorm),
// named as PyTorch registers it (ProcessGroup.group_name); without one, each process normalises over its own batch.
// The reductions are sums of float64 tensors over the group by PyTorch's functional collectives
// (_c10d_functional::all_reduce, on the tensors' device: gloo on CPU, nccl on GPUs); every process of the group
// must make the same calls in the same order, which the kernels do by reducing each BatchNorm at the same point of
// the same code whatever their local batch (N = 0 included).
class SyncGroup {
 public:
  explicit SyncGroup(const std::optional<c10::string_view>& name);
  bool active() const { return !name_.empty(); }
  // mean, var [C] (float64; biased variance) of count values per channel on this process become the group's, in
  // place (the mean first, then the squared deviations about it: no cancellation). Without a group, nothing changes.
  void moments(at::Tensor& mean, at::Tensor& var, double count) const;
  // sums [C, 2] (float64: sum dy, sum dy (x - mean) per channel) become the group's, in place; returns the group's
  // count (count without a group).
  double grad_sums(at::Tensor& sums, double count) const;

 private:
  std::string name_;
};

// Sizes of a Ghost module's primary and cheap branches.
struct GhostSizes {
  int64_t batch, in_channels, height, width;
  int64_t init, cheap, multiplier, oup, dw;  // cheap output channel j reads primary channel j / multiplier
};

// Sizes of a DFC attention branch.
struct DfcSizes {
  int64_t channels, kernel;      // C and K
  int64_t pooled_h, pooled_w;    // the gate's resolution
  bool nearest;                  // upsample mode
};

// Each check raises c10::Error (RuntimeError in Python) naming the op, the argument and what was expected.
void check_input(const char* op, const at::Tensor& x, const char* name = "x");
GhostSizes check_ghost_arguments(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                                 const at::Tensor& cheap_weight, int64_t oup);
DfcSizes check_dfc_arguments(const char* op, const at::Tensor& x, const at::Tensor& conv_weight,
                             const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight,
                             int64_t channels, const std::string& upsample);
void check_features(const char* op, const at::Tensor& features, const at::Tensor& x, int64_t channels);
// bn_*: one [channels[i]] tensor per BatchNorm (floating point, x's device); bn_eps: positive.
void check_batch_norms(const char* op, const at::Tensor& x, at::TensorList bn_weight, at::TensorList bn_bias,
                       at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                       const std::vector<int64_t>& channels);
// Training needs more than one value per channel (as nn.BatchNorm2d). Checked on the local batch only (`training`
// false with a SyncGroup: the op's Python function checks the group's count).
void check_training_count(const char* op, int64_t count, bool training);
// grad_out: [N, channels, H, W] like x (dtype, device).
void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, int64_t channels);
// grad_out: of shape `sizes`, like x (dtype, device).
void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef sizes);

// Every argument of one op (the schemas in ghostfused/ops), checked as above; the CPU kernels and the CUDA glue
// call these first, forward and backward alike. `training` as for check_training_count.
GhostSizes check_ghost_concat_arguments(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                                        const at::Tensor& cheap_weight, at::TensorList bn_weight,
                                        at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
                                        at::ArrayRef<double> bn_eps, int64_t oup, bool training);
DfcSizes check_dfc_attention_arguments(const char* op, const at::Tensor& x, const at::Tensor& features,
                                       const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                                       const at::Tensor& vertical_weight, at::TensorList bn_weight,
                                       at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
                                       at::ArrayRef<double> bn_eps, const std::string& upsample, bool training);
// Sizes of a depthwise convolution + BatchNorm (ghostfused/ops/depthwise_bn.py).
struct DepthwiseSizes {
  int64_t batch, channels, height, width;
  int k;
  int64_t stride, out_h, out_w;
};
DepthwiseSizes check_depthwise_bn_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                            at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                            at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t stride,
                                            bool training);
// Sizes of the stem's convolution (csrc/cpu/stem.cpp): dense, odd k x k kernel, zero padding k / 2.
struct StemSizes {
  int64_t batch, in_channels, height, width, out_channels;
  int k;
  int64_t stride, out_h, out_w;
};
// bias: undefined / None, or [out_channels] like x; one BatchNorm of out_channels.
StemSizes check_stem_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::TensorList bn_weight, at::TensorList bn_bias,
                               at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                               int64_t stride);
struct GhostAttnSizes {
  GhostSizes ghost;
  DfcSizes dfc;
};
GhostAttnSizes check_ghost_attn_arguments(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                                          const at::Tensor& cheap_weight, const at::Tensor& conv_weight,
                                          const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight,
                                          at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                          at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup,
                                          const std::string& upsample, bool training);

}  // namespace ghostfused
