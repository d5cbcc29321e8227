// The extension's entry point: the schemas of the backend kernels (namespace ghostfused_C) and the Python module.
//
// Each fused op <op> of ghostfused/ops/<op>.py has a <op>_forward and a <op>_backward kernel here with the same
// arguments and results as the Python op, without `backend` (ghostfused/ops/define.py: the forward's fourth result,
// `saved`, is what the backward reads instead of recomputing it; the CPU kernels save the primary convolution's
// output in training, the CUDA ones nothing). The CPU kernels register under the CPU dispatch key
// (csrc/cpu/<op>.cpp), the CUDA ones under CUDA (csrc/cuda/<op>_glue.cpp); the `cpu` and `cuda` backends call
// torch.ops.ghostfused_C.<op>_forward / _backward and the dispatcher picks by device.
#include <torch/extension.h>

#include "cpu/block_cache.h"
#include "ghostfused/batch_norm.h"
#include "ghostfused/depthwise.h"
#include "ghostfused/index_maps.h"
#include "ghostfused/schemas.h"

TORCH_LIBRARY(ghostfused_C, m) {
  m.def("ghost_concat_forward(" GHOSTFUSED_GHOST_CONCAT_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ghost_concat_backward(Tensor grad_out, Tensor saved, " GHOSTFUSED_GHOST_CONCAT_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dfc_attention_forward(" GHOSTFUSED_DFC_ATTENTION_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dfc_attention_backward(Tensor grad_out, Tensor saved, " GHOSTFUSED_DFC_ATTENTION_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ghost_attn_forward(" GHOSTFUSED_GHOST_ATTN_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ghost_attn_backward(Tensor grad_out, Tensor saved, " GHOSTFUSED_GHOST_ATTN_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("depthwise_bn_forward(" GHOSTFUSED_DEPTHWISE_BN_ARGS ") -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("depthwise_bn_backward(Tensor grad_out, Tensor saved, " GHOSTFUSED_DEPTHWISE_BN_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor)");
  // Eval only (no backward): GhostNetV2's stem for the fused model's inference (ghostfused/ops/stem.py).
  m.def("stem_forward(Tensor x, Tensor weight, Tensor? bias, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, "
        "Tensor[] bn_var, float[] bn_eps, int stride, bool relu) -> Tensor");
}

namespace {

// The shared host/device math of csrc/include/ghostfused, evaluated on the host for tests (tests/test_cpu.py
// compares it with PyTorch's own pooling, interpolation and convolution).
template <typename Acc>
std::vector<std::tuple<int64_t, int64_t, double, double>> bilinear_taps(int64_t in_size, int64_t out_size) {
  std::vector<std::tuple<int64_t, int64_t, double, double>> taps;
  for (int64_t i = 0; i < out_size; ++i) {
    const ghostfused::BilinearTap<Acc> t = ghostfused::bilinear_tap<Acc>(i, in_size, out_size);
    taps.emplace_back(t.i0, t.i1, t.w0, t.w1);
  }
  return taps;
}

at::Tensor depthwise_reference(const at::Tensor& plane, const at::Tensor& taps, bool transposed) {
  TORCH_CHECK(plane.dim() == 2 && taps.dim() == 2 && plane.scalar_type() == at::kDouble &&
                  taps.scalar_type() == at::kDouble,
              "_depthwise_reference: plane [H, W] and taps [kh, kw], float64");
  const at::Tensor p = plane.contiguous(), t = taps.contiguous();
  const int64_t height = p.size(0), width = p.size(1);
  const double* src = p.data_ptr<double>();
  at::Tensor out = at::empty_like(p);
  const double* weights = t.data_ptr<double>();
  auto load = [&](int64_t r, int64_t c) { return src[r * width + c]; };
  auto tap = [&](int index) { return weights[index]; };
  double* dst = out.data_ptr<double>();
  for (int64_t i = 0; i < height; ++i)
    for (int64_t j = 0; j < width; ++j)
      dst[i * width + j] = transposed ? ghostfused::depthwise_transposed_at<double>(load, tap, static_cast<int>(t.size(0)),
                                                                                   static_cast<int>(t.size(1)), i, j,
                                                                                   height, width)
                                      : ghostfused::depthwise_at<double>(load, tap, static_cast<int>(t.size(0)),
                                                                         static_cast<int>(t.size(1)), i, j, height,
                                                                         width);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", [] { return GHOSTFUSED_WITH_CUDA != 0; },
        "Whether the extension was compiled with its CUDA kernels.");
  m.def("_cpu_block_cache_info", [] {
        const ghostfused::cpu::BlockCacheInfo info = ghostfused::cpu::block_cache_info();
        return std::make_tuple(info.idle_bytes, info.limit_bytes, info.reused);
      },
      "The CPU kernels' block cache (csrc/cpu/block_cache.h): (idle bytes, their bound, requests served from idle "
      "blocks).");
  m.def("_cpu_block_cache_clear", &ghostfused::cpu::block_cache_clear,
        "Free the idle blocks of the CPU kernels' block cache.");
  m.def("_pooled_size", &ghostfused::pooled_size, "Shared math (tests): size after the 2x2 average pooling.");
  m.def("_nearest_source_index", &ghostfused::nearest_source_index,
        "Shared math (tests): source index of output index i for nearest upsampling (i, in_size, out_size).");
  m.def("_bilinear_taps", [](int64_t in_size, int64_t out_size, bool float64) {
        return float64 ? bilinear_taps<double>(in_size, out_size) : bilinear_taps<float>(in_size, out_size);
      },
      "Shared math (tests): (i0, i1, w0, w1) of every output index of a bilinear upsampling.");
  m.def("_tap_range", [](int64_t i, int64_t size, int k) {
        const ghostfused::TapRange r = ghostfused::tap_range(i, size, k);
        return std::make_pair(r.lo, r.hi);
      },
      "Shared math (tests): the taps of a size-k kernel that output i may read.");
  m.def("_tap_outputs", [](int t, int64_t size, int k) {
        const ghostfused::TapRange r = ghostfused::tap_outputs(t, size, k);
        return std::make_pair(r.lo, r.hi);
      },
      "Shared math (tests): the outputs that tap t of a size-k kernel may reach.");
  m.def("_depthwise_reference", &depthwise_reference,
        "Shared math (tests): the depthwise convolution (or, transposed=True, its transpose) of one plane by "
        "ghostfused::depthwise_at / depthwise_transposed_at (float64).");
  m.def("_batch_norm_backward", [](double weight, double mean, double var, double eps, double sum_dy,
                                   double sum_dy_centered, double count, bool training) {
        const auto g = ghostfused::batch_norm_backward<double>(weight, mean, var, eps,
                                                              {sum_dy, sum_dy_centered}, count, training);
        return std::make_tuple(g.a, g.b, g.c);
      },
      "Shared math (tests): (a, b, c) with dx = a dy + b x + c of a BatchNorm's backward.");
}
