// The extension's entry point: the schemas of the backend kernels (namespace ghostfused_C) and the Python module.
//
// Each fused op <op> of ghostfused/ops/<op>.py has a <op>_forward and a <op>_backward kernel here with the same
// arguments and results as the Python op, without `backend` (ghostfused/ops/define.py: the forward's fourth result,
// `saved`, is what the backward reads instead of recomputing it; the CPU kernels save the primary convolution's
// output in training, the CUDA ones nothing). The CPU kernels register under the CPU dispatch key
// (csrc/cpu/<op>.cpp), the CUDA ones under CUDA (csrc/cuda/<op>_glue.cpp), and the dispatcher picks by device.
//
// The `cpu` and `cuda` backends call them through this module's Python entry point per kernel
// (ghostfused._C.<op>_forward, ...): the kernel through the dispatcher unboxed, below autograd, as a custom op's
// implementation runs. A call through torch.ops.ghostfused_C boxes every argument onto the dispatcher's stack (tens
// of values for five BatchNorms) and unboxes it again, which costs more than a small kernel at batch 1.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

// How a Python entry point receives an argument that the kernel takes as T: an owning value pybind11 converts from
// Python (a list into a vector, a str into a std::string), lent to the kernel as T.
template <typename T>
struct Received {
  using type = std::decay_t<T>;
  static T lend(const type& value) { return value; }
};

template <>
struct Received<at::TensorList> {
  using type = std::vector<at::Tensor>;
  static at::TensorList lend(const type& value) { return value; }
};

template <>
struct Received<at::ArrayRef<double>> {
  using type = std::vector<double>;
  static at::ArrayRef<double> lend(const type& value) { return value; }
};

template <>
struct Received<c10::string_view> {
  using type = std::string;
  static c10::string_view lend(const type& value) { return value; }
};

template <>
struct Received<std::optional<c10::string_view>> {
  using type = std::optional<std::string>;
  static std::optional<c10::string_view> lend(const type& value) {
    return value.has_value() ? std::optional<c10::string_view>(*value) : std::nullopt;
  }
};

template <typename Signature>
struct EntryPoint;

// The Python entry point of kernel `name` (schema name, signature Result(Args...)): a typed dispatcher call below
// autograd (what a custom op's autograd fallback does before it redispatches), so the dispatcher picks the kernel
// by the arguments' devices and records the call for the profiler, as for torch.ops. The signature is checked
// against the schema here, when the module loads.
template <typename Result, typename... Args>
struct EntryPoint<Result(Args...)> {
  static auto make(const std::string& name) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").typed<Result(Args...)>();
    return [op](const typename Received<Args>::type&... args) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return op.call(Received<Args>::lend(args)...);
    };
  }
};

// Define the Python entry point `name` of kernel ghostfused_C::<name>.
template <typename Signature>
void define_entry_point(pybind11::module_& m, const std::string& name) {
  m.def(name.c_str(), EntryPoint<Signature>::make("ghostfused_C::" + name),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        ("torch.ops.ghostfused_C." + name + ", called below autograd without boxing its arguments.").c_str());
}

template <typename Arguments, typename BackwardResult>
struct OpEntryPoints;

// The entry points of a fused op's forward and backward kernels (<op>_forward, <op>_backward): Arguments is
// void(the op's argument types, schemas.h), BackwardResult the backward's tuple of gradients.
template <typename... Args, typename BackwardResult>
struct OpEntryPoints<void(Args...), BackwardResult> {
  static void define(pybind11::module_& m, const std::string& op) {
    define_entry_point<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(Args...)>(m, op + "_forward");
    define_entry_point<BackwardResult(const at::Tensor&, const at::Tensor&, Args...)>(m, op + "_backward");
  }
};

// Whether a kernel called with `args` (an op's schema arguments) would be seen by nothing but autograd and record no
// graph, outside autocast: ghostfused.ops.direct.unobserved's checks of C++ state (tracer, dispatch modes, functorch
// transforms: torch._C._are_functorch_transforms_active's keys; grad mode) and of the arguments (plain tensors and
// parameters, no tensor subclass; the schemas' scalars; lists spliced in), with autocast on x's device, in one call
// (ghostfused.ops.direct.kernel_call_allowed: the fused layers' eval path, where a dozen Python calls cost more than
// a small kernel). torch.compile and ONNX export are Python state, checked there.
bool unobserved_kernel_call(const pybind11::tuple& args) {
  if (args.empty() || !THPVariable_Check(args[0].ptr())) return false;
  const c10::DeviceType device = THPVariable_Unpack(args[0].ptr()).device().type();
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  if (torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      tls.included_.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      tls.included_.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) ||
      (at::autocast::is_autocast_available(device) && at::autocast::is_autocast_enabled(device)))
    return false;
  const bool grad_mode = c10::GradMode::is_enabled();
  const auto plain = [grad_mode](PyObject* value) {
    if (THPVariable_CheckExact(value)) return !grad_mode || !THPVariable_Unpack(value).requires_grad();
    return value == Py_None || PyBool_Check(value) || PyLong_CheckExact(value) || PyFloat_CheckExact(value) ||
           PyUnicode_CheckExact(value);
  };
  for (const pybind11::handle arg : args) {
    if (!PyList_CheckExact(arg.ptr())) {
      if (!plain(arg.ptr())) return false;
      continue;
    }
    for (const pybind11::handle item : arg)
      if (!plain(item.ptr())) return false;
  }
  return true;
}

template <size_t... I>
auto tensor_tuple(std::index_sequence<I...>) -> std::tuple<decltype((void)I, at::Tensor())...>;

// A tuple of n tensors: a backward's results.
template <size_t n>
using Tensors = decltype(tensor_tuple(std::make_index_sequence<n>()));

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
  // Backward results: one gradient per leading tensor, then the packed BatchNorm weight and bias gradients.
  OpEntryPoints<void(GHOSTFUSED_GHOST_CONCAT_TYPES), Tensors<5>>::define(m, "ghost_concat");
  OpEntryPoints<void(GHOSTFUSED_DFC_ATTENTION_TYPES), Tensors<7>>::define(m, "dfc_attention");
  OpEntryPoints<void(GHOSTFUSED_GHOST_ATTN_TYPES), Tensors<8>>::define(m, "ghost_attn");
  OpEntryPoints<void(GHOSTFUSED_DEPTHWISE_BN_TYPES), Tensors<4>>::define(m, "depthwise_bn");
  define_entry_point<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::TensorList,
                                at::TensorList, at::TensorList, at::TensorList, at::ArrayRef<double>, int64_t, bool)>(
      m, "stem_forward");
  m.def("unobserved_kernel_call", &unobserved_kernel_call, pybind11::arg("args"),
        "Whether a kernel called with args (x first) would be seen by nothing but autograd, record no graph and run "
        "outside autocast (ghostfused.ops.direct.kernel_call_allowed).");
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
