// ghost_attn on the GPU: the DFC gate at quarter resolution (dfc_attention_glue.h), then the Ghost branches'
// fused write (ghost_concat_glue.h) with the upsampled gate applied in that write. No kernels of its own.
#include <torch/library.h>

#include "dfc_attention_glue.h"
#include "ghost_concat_glue.h"

namespace ghostfused::cuda_glue {
namespace {

constexpr const char* kForward = "ghostfused_C::ghost_attn_forward";
constexpr const char* kBackward = "ghostfused_C::ghost_attn_backward";

// The Ghost branches' two BatchNorms and the DFC branch's three, as the schema lists them.
struct States {
  GhostState ghost;
  DfcState dfc;
};

States states(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
              const at::Tensor& conv_weight, const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight,
              at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
              at::ArrayRef<double> bn_eps, const SyncGroup& sync, const GhostAttnSizes& s, bool relu,
              bool batch_statistics) {
  std::vector<DeviceBatchNorm> bns = device_batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync);
  DfcState dfc = dfc_state(x, conv_weight, horizontal_weight, vertical_weight, {bns[2], bns[3], bns[4]}, s.dfc,
                           batch_statistics);
  GhostState ghost = ghost_state(x, primary_weight, cheap_weight, bns[0], bns[1], s.ghost, relu, batch_statistics);
  return {std::move(ghost), std::move(dfc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_attn_forward(
    const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
    const at::Tensor& conv_weight, const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight,
    at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
    at::ArrayRef<double> bn_eps, int64_t oup, bool relu, c10::string_view upsample, bool training,
    std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const GhostAttnSizes s = check_ghost_attn_arguments(kForward, x, primary_weight, cheap_weight, conv_weight,
    horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, std::string(upsample),
    training && !sync.active());
  const States st = states(x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight,
                           bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync, s, relu, training);
  const GhostSizes& gs = s.ghost;
  at::Tensor out = empty_output({gs.batch, gs.oup, gs.height, gs.width}, x.options(), memory_format_of(x));
  check(cuda::launch_ghost_write(st.ghost.args(st.dfc.view()), out.data_ptr(), current_stream()), "ghost_write");
  const std::vector<const DeviceBatchNorm*> bns = {&st.ghost.primary_bn, &st.ghost.cheap_bn, &st.dfc.bns[0],
                                                   &st.dfc.bns[1], &st.dfc.bns[2]};
  std::vector<at::Tensor> means, vars;
  for (const DeviceBatchNorm* bn : bns) {
    means.push_back(bn->mean);
    vars.push_back(bn->var);
  }
  return {out, packed(means, x), packed(vars, x), nothing_saved(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ghost_attn_backward(const at::Tensor& grad_out, const at::Tensor& /*saved*/, const at::Tensor& x,
                    const at::Tensor& primary_weight, const at::Tensor& cheap_weight, const at::Tensor& conv_weight,
                    const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight, at::TensorList bn_weight,
                    at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
                    at::ArrayRef<double> bn_eps, int64_t oup, bool relu, c10::string_view upsample, bool training,
                    std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const GhostAttnSizes s = check_ghost_attn_arguments(kBackward, x, primary_weight, cheap_weight, conv_weight,
    horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, std::string(upsample),
    training && !sync.active());
  check_grad_out(kBackward, grad_out, x, oup);
  const States st = states(x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight,
                           bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync, s, relu, false);
  const GhostSizes& gs = s.ghost;
  at::Tensor product = empty_full_resolution({gs.batch, gs.oup, gs.height, gs.width},
                                             x.options().dtype(acc_dtype(x)), st.ghost.nhwc);
  const GhostGrads ghost = ghost_backward(st.ghost, dense(grad_out, st.ghost.nhwc), st.dfc.view(), product, training);
  const DfcGrads dfc = dfc_backward(st.dfc, product, training);
  at::Tensor dx = ghost.x.view(x.sizes());
  pool_backward(st.dfc, dfc.pooled, dx, true);
  std::vector<at::Tensor> weight_grads = {ghost.primary_bn.weight_grad, ghost.cheap_bn.weight_grad};
  std::vector<at::Tensor> bias_grads = {ghost.primary_bn.bias_grad, ghost.cheap_bn.bias_grad};
  for (const DeviceBatchNormGrad& g : dfc.bns) {
    weight_grads.push_back(g.weight_grad);
    bias_grads.push_back(g.bias_grad);
  }
  return {dx,
          ghost.primary_weight.view(primary_weight.sizes()),
          ghost.cheap_weight.view(cheap_weight.sizes()),
          dfc.conv_weight.view(conv_weight.sizes()),
          dfc.horizontal_weight.view(horizontal_weight.sizes()),
          dfc.vertical_weight.view(vertical_weight.sizes()),
          packed(weight_grads, x),
          packed(bias_grads, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CUDA, m) {
  m.impl("ghost_attn_forward", &ghost_attn_forward);
  m.impl("ghost_attn_backward", &ghost_attn_backward);
}

}  // namespace ghostfused::cuda_glue
