// ghost_attn on the CPU: the DFC gate at quarter resolution (dfc_attention.h), then the Ghost branches'
// fused write (ghost_concat.h) with the upsampled gate applied as each output element is written.
#include <torch/library.h>

#include "dfc_attention.h"
#include "ghost_concat.h"

namespace ghostfused::cpu {
namespace {

constexpr const char* kForward = "ghostfused_C::ghost_attn_forward";
constexpr const char* kBackward = "ghostfused_C::ghost_attn_backward";

// The op's five BatchNorms split into the Ghost branch's two and the DFC branch's three.
std::pair<std::vector<BatchNorm>, std::vector<BatchNorm>> split_batch_norms(std::vector<BatchNorm> bns) {
  std::vector<BatchNorm> dfc(std::make_move_iterator(bns.begin() + 2), std::make_move_iterator(bns.end()));
  bns.erase(bns.begin() + 2, bns.end());
  return {std::move(bns), std::move(dfc)};
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
  auto [ghost_bns, dfc_bns] = split_batch_norms(batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync));
  const at::ScalarType dtype = compute_dtype(x);
  const GhostSizes& gs = s.ghost;
  const bool nhwc = takes_nhwc_path(x);  // x and out stay NHWC
  const at::Tensor xd = nhwc ? dense_channels_last(x, dtype) : dense(x, dtype);
  at::Tensor out = empty_output({gs.batch, gs.oup, gs.height, gs.width}, xd.options(), memory_format_of(x));
  at::Tensor mean, var, saved;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ghost_attn_forward", [&] {
    const DfcGate<scalar_t> g = dfc_gate<scalar_t>(xd, conv_weight, horizontal_weight, vertical_weight,
                                                   std::move(dfc_bns), s.dfc, training, false);
    const Gate<scalar_t> gate = g.view();
    const GhostBranch<scalar_t> b = ghost_branch<scalar_t>(xd, primary_weight, cheap_weight, std::move(ghost_bns[0]),
                                                           std::move(ghost_bns[1]), gs, relu, training, at::Tensor());
    ghost_write(b, &gate, out.data_ptr<scalar_t>());
    std::tie(mean, var) = packed_statistics({&b.primary_bn, &b.cheap_bn, &g.bns[0], &g.bns[1], &g.bns[2]}, x);
    saved = saved_primary(b, training);
  });
  return {as_output(out, x), mean, var, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ghost_attn_backward(const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& x,
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
  auto [ghost_bns, dfc_bns] = split_batch_norms(batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync));
  const at::ScalarType dtype = compute_dtype(x);
  const bool nhwc = takes_nhwc_path(x);  // x, grad_out and dx stay NHWC
  const at::Tensor xd = nhwc ? dense_channels_last(x, dtype) : dense(x, dtype);
  const at::Tensor grad = nhwc ? dense_channels_last(grad_out, dtype) : dense(grad_out, dtype);
  GhostGrads ghost;
  DfcGrads dfc;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ghost_attn_backward", [&] {
    const DfcGate<scalar_t> g = dfc_gate<scalar_t>(xd, conv_weight, horizontal_weight, vertical_weight,
                                                   std::move(dfc_bns), s.dfc, false, true);
    const GhostBranch<scalar_t> b = ghost_branch<scalar_t>(xd, primary_weight, cheap_weight, std::move(ghost_bns[0]),
                                                           std::move(ghost_bns[1]), s.ghost, relu, false, saved);
    const Gate<scalar_t> gate = g.view();
    at::Tensor dgate = cached_empty(g.gate.sizes(), g.gate.options());
    ghost = ghost_backward(b, grad.data_ptr<scalar_t>(), &gate, dgate.data_ptr<scalar_t>(), training);
    dfc = dfc_gate_backward(g, dgate.data_ptr<scalar_t>(), training);
    pool_backward<scalar_t>(dfc.pooled, s.ghost.height, s.ghost.width, ghost.x.data_ptr<scalar_t>(), true, g.nhwc);
  });
  const at::ScalarType out_dtype = x.scalar_type();
  return {ghost.x.to(out_dtype),
          ghost.primary_weight.view(primary_weight.sizes()).to(out_dtype),
          ghost.cheap_weight.view(cheap_weight.sizes()).to(out_dtype),
          dfc.conv_weight.view(conv_weight.sizes()).to(out_dtype),
          dfc.horizontal_weight.view(horizontal_weight.sizes()).to(out_dtype),
          dfc.vertical_weight.view(vertical_weight.sizes()).to(out_dtype),
          packed({&ghost.primary_bn_weight, &ghost.cheap_bn_weight, &dfc.bn_weight[0], &dfc.bn_weight[1],
                  &dfc.bn_weight[2]}, x),
          packed({&ghost.primary_bn_bias, &ghost.cheap_bn_bias, &dfc.bn_bias[0], &dfc.bn_bias[1],
                  &dfc.bn_bias[2]}, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CPU, m) {
  m.impl("ghost_attn_forward", &ghost_attn_forward);
  m.impl("ghost_attn_backward", &ghost_attn_backward);
}

}  // namespace ghostfused::cpu
