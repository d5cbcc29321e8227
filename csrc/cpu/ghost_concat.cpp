// ghost_concat on the CPU: the primary 1x1 convolution as one GEMM over the batch, then fused passes per primary
// channel plane that apply BatchNorm and the activation, run the cheap depthwise convolution of every cheap
// channel reading that plane, and write both branches straight into their channel ranges of the output.
#include "ghost_concat.h"

#include <torch/library.h>

namespace ghostfused::cpu {
namespace {

// Elements per row block of the fused write: a block's rows stay in L1 / L2 from the cheap convolution to the write.
constexpr int64_t kBlockElements = 8192;

// The number of cheap channels of primary channel c that land in the output (the others are dropped by [:oup]).
int64_t kept_cheap_channels(const GhostSizes& s, int64_t c) {
  return std::clamp<int64_t>(s.oup - s.init - c * s.multiplier, 0, s.multiplier);
}

// a1[q] = act(BN0(y[q])), q in [begin, end).
template <typename T>
void primary_values(const T* y, Affine<T> bn, bool relu, int64_t begin, int64_t end, T* a1) {
#pragma omp simd
  for (int64_t q = begin; q < end; ++q) a1[q] = activate(bn.scale * y[q] + bn.shift, relu);
}

// dst[q] = values[q] * gate[q], or values[q] without a gate.
template <typename T>
void gated_store(const T* values, const T* gate, int64_t count, T* dst) {
  if (gate == nullptr) {
    std::copy(values, values + count, dst);
    return;
  }
#pragma omp simd
  for (int64_t q = 0; q < count; ++q) dst[q] = values[q] * gate[q];
}

// dgate's plane of gate channel c: grad (= grad_out * the ungated output, full resolution) reduced by the
// transposed upsampling.
template <typename T>
void gate_grad(const Gate<T>& gate, const T* grad, int64_t n, int64_t c, T* dgate) {
  T* plane = dgate + (n * gate.channels + c) * gate.h * gate.w;
  std::fill(plane, plane + gate.h * gate.w, T(0));
  gate.reduce(grad, 0, gate.H, plane);
}

// Per-thread buffers of the passes over one primary plane.
template <typename T>
struct Scratch {
  ShiftedColumns<T> a1;          // act(BN0(y1)) of the plane, read by the cheap convolutions
  std::vector<T> conv;           // a cheap convolution's output (rows of a block, or the plane)
  std::vector<T> gate;           // the gate at full resolution for the rows at hand
  ShiftedColumnsGrad<T> a1_grad; // backward: a1's gradient from the cheap convolutions, per tap column
  std::vector<T> a1_grad_sum, grad, product;

  Scratch(const GhostSizes& s, int64_t rows, bool backward)
      : a1(s.height, s.width, static_cast<int>(s.dw)), conv(rows * s.width),
        gate(std::min(s.height, rows + 2 * (s.dw / 2)) * s.width),
        a1_grad(backward ? s.height : 0, s.width, static_cast<int>(s.dw)),
        a1_grad_sum(backward ? s.height * s.width : 0), grad(backward ? s.height * s.width : 0),
        product(backward ? s.height * s.width : 0) {}
};

template <typename T>
std::vector<Moments> cheap_moments(const GhostBranch<T>& g) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, taps = s.dw * s.dw;
  const T* y1 = g.y1.template data_ptr<T>();
  const T* cheap_weight = g.cheap_weight.template data_ptr<T>();
  std::vector<Moments> partials(s.batch * s.cheap);
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, false);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      primary_values(y1 + plane * size, g.primary_affine[c], g.relu, 0, size, sc.a1.plane.data());
      sc.a1.set_rows(0, s.height);
      for (int64_t r = 0; r < s.multiplier; ++r) {
        const int64_t j = c * s.multiplier + r;
        depthwise_rows(sc.a1, cheap_weight + j * taps, 0, s.height, sc.conv.data());
        partials[n * s.cheap + j] = moments_of(sc.conv.data(), size);
      }
    }
  });
  return combine_planes(partials, s.batch, s.cheap);
}

// Cheap channel j of sample n, given a1 in sc.a1: its convolution y2 into sc.conv and the gradient of its
// BatchNorm's output into sc.grad. Returns the BatchNorm backward's sums; with dgate, writes the gate channel's
// gradient (grad_out times the ungated output, reduced to the gate's resolution).
template <typename T>
GradSums cheap_channel_grad(const GhostBranch<T>& g, int64_t n, int64_t j, const T* grad_out, const Gate<T>* gate,
                            T* dgate, Scratch<T>& sc) {
  const GhostSizes& s = g.sizes;
  const int64_t och = s.init + j, size = s.height * s.width;
  const T* y2 = sc.conv.data();
  depthwise_rows(sc.a1, g.cheap_weight.template data_ptr<T>() + j * s.dw * s.dw, 0, s.height, sc.conv.data());
  const Affine<T> bn = g.cheap_affine[j];
  const bool relu = g.relu;
  const T* go = grad_out + (n * s.oup + och) * size;
  T* dv = sc.grad.data();
  if (gate == nullptr) {
#pragma omp simd
    for (int64_t q = 0; q < size; ++q) dv[q] = activation_backward(go[q], activate(bn.scale * y2[q] + bn.shift, relu), relu);
  } else {
    gate->values(n, och, 0, s.height, sc.gate.data());
    const T* gv = sc.gate.data();
    T* product = sc.product.data();
#pragma omp simd
    for (int64_t q = 0; q < size; ++q) {
      const T a2 = activate(bn.scale * y2[q] + bn.shift, relu);
      dv[q] = activation_backward(go[q] * gv[q], a2, relu);
      product[q] = go[q] * a2;
    }
    if (dgate != nullptr) gate_grad(*gate, product, n, och, dgate);
  }
  return grad_sums_of(dv, y2, g.cheap_bn.mean[j], size);
}

// The cheap BatchNorm's backward sums over the batch (training only: its coefficients depend on them).
template <typename T>
std::vector<GradSums> cheap_grad_sums(const GhostBranch<T>& g, const T* grad_out, const Gate<T>* gate) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width;
  const T* y1 = g.y1.template data_ptr<T>();
  std::vector<GradSums> partials(s.batch * s.cheap, GradSums{0, 0});
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, true);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      const int64_t kept = kept_cheap_channels(s, c);
      if (kept == 0) continue;
      primary_values(y1 + plane * size, g.primary_affine[c], g.relu, 0, size, sc.a1.plane.data());
      sc.a1.set_rows(0, s.height);
      for (int64_t r = 0; r < kept; ++r) {
        const int64_t j = c * s.multiplier + r;
        partials[n * s.cheap + j] = cheap_channel_grad(g, n, j, grad_out, gate, static_cast<T*>(nullptr), sc);
      }
    }
  });
  return combine_planes(partials, s.batch, s.cheap);
}

}  // namespace

template <typename T>
GhostBranch<T> ghost_branch(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
                            BatchNorm primary_bn, BatchNorm cheap_bn, const GhostSizes& sizes, bool relu,
                            bool batch_statistics) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<T>::value;
  const GhostSizes& s = sizes;
  GhostBranch<T> g{sizes,
                   relu,
                   dense(x, dtype).view({s.batch, s.in_channels, s.height * s.width}),
                   dense(primary_weight, dtype).view({s.init, s.in_channels}),
                   dense(cheap_weight, dtype).view({s.cheap, s.dw * s.dw}),
                   at::Tensor(),
                   std::move(primary_bn),
                   std::move(cheap_bn),
                   {},
                   {}};
  g.y1 = conv1x1(g.x, g.primary_weight);
  if (batch_statistics)
    set_batch_statistics(g.primary_bn, channel_moments(g.y1.template data_ptr<T>(), s.batch, s.init,
                                                       s.height * s.width));
  g.primary_affine = folded<T>(g.primary_bn);
  if (batch_statistics) set_batch_statistics(g.cheap_bn, cheap_moments(g));
  g.cheap_affine = folded<T>(g.cheap_bn);
  return g;
}

template <typename T>
void ghost_write(const GhostBranch<T>& g, const Gate<T>* gate, T* out) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, taps = s.dw * s.dw, pad = s.dw / 2;
  const T* y1 = g.y1.template data_ptr<T>();
  const T* cheap_weight = g.cheap_weight.template data_ptr<T>();
  const int64_t block = std::clamp<int64_t>(kBlockElements / std::max<int64_t>(s.width, 1), 1, s.height);
  const bool relu = g.relu;
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, block, false);
    T* a1 = sc.a1.plane.data();
    T* gv = gate != nullptr ? sc.gate.data() : nullptr;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      const int64_t kept = kept_cheap_channels(s, c);
      int64_t ready = 0;  // rows of a1 computed (and written to the output) so far
      for (int64_t row0 = 0; row0 < s.height; row0 += block) {
        const int64_t row1 = std::min(s.height, row0 + block);
        const int64_t needed = kept > 0 ? std::min(s.height, row1 + pad) : row1;
        if (needed > ready) {
          primary_values(y1 + plane * size, g.primary_affine[c], relu, ready * s.width, needed * s.width, a1);
          if (kept > 0) sc.a1.set_rows(ready, needed);
          if (gate != nullptr) gate->values(n, c, ready, needed, gv);
          gated_store(a1 + ready * s.width, gv, (needed - ready) * s.width,
                      out + (n * s.oup + c) * size + ready * s.width);
          ready = needed;
        }
        for (int64_t r = 0; r < kept; ++r) {
          const int64_t j = c * s.multiplier + r, och = s.init + j, count = (row1 - row0) * s.width;
          const Affine<T> bn = g.cheap_affine[j];
          depthwise_rows(sc.a1, cheap_weight + j * taps, row0, row1, sc.conv.data());
          T* values = sc.conv.data();
#pragma omp simd
          for (int64_t q = 0; q < count; ++q) values[q] = activate(bn.scale * values[q] + bn.shift, relu);
          if (gate != nullptr) gate->values(n, och, row0, row1, gv);
          gated_store(values, gv, count, out + (n * s.oup + och) * size + row0 * s.width);
        }
      }
    }
  });
}

template <typename T>
GhostGrads ghost_backward(const GhostBranch<T>& g, const T* grad_out, const Gate<T>* gate, T* dgate,
                          bool training) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, taps = s.dw * s.dw;
  const double count = static_cast<double>(s.batch * size);
  const std::vector<GradSums> no_sums(s.cheap, GradSums{0, 0});
  const std::vector<BatchNormGrad<T>> cheap_coefficients = backward_coefficients<T>(
      g.cheap_bn, training ? cheap_grad_sums(g, grad_out, gate) : no_sums, count, training);
  const std::vector<BatchNormGrad<T>> eval_primary =
      backward_coefficients<T>(g.primary_bn, std::vector<GradSums>(s.init, GradSums{0, 0}), count, false);

  // One pass per primary plane: the cheap channels' backward (BatchNorm, weight gradient, transposed convolution
  // into a1's gradient), then the primary channel's (gate, activation). y1_grad holds the gradient of the
  // primary BatchNorm's output (training) or of y1 itself (eval).
  const T* y1 = g.y1.template data_ptr<T>();
  const T* cheap_weight = g.cheap_weight.template data_ptr<T>();
  at::Tensor y1_grad = at::empty_like(g.y1);
  T* y1_grad_data = y1_grad.template data_ptr<T>();
  std::vector<GradSums> cheap_partials(s.batch * s.cheap, GradSums{0, 0});
  std::vector<GradSums> primary_partials(s.batch * s.init, GradSums{0, 0});
  std::vector<double> tap_partials(s.batch * s.cheap * taps, 0.0);
  const bool relu = g.relu;
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, true);
    T* a1 = sc.a1.plane.data();
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      const int64_t kept = kept_cheap_channels(s, c);
      const T* y = y1 + plane * size;
      primary_values(y, g.primary_affine[c], relu, 0, size, a1);
      sc.a1.set_rows(0, s.height);
      sc.a1_grad.zero();
      for (int64_t r = 0; r < kept; ++r) {
        const int64_t j = c * s.multiplier + r;
        cheap_partials[n * s.cheap + j] = cheap_channel_grad(g, n, j, grad_out, gate, dgate, sc);
        const BatchNormGrad<T> k = cheap_coefficients[j];
        T* dv = sc.grad.data();
        const T* y2 = sc.conv.data();
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dv[q] = k.a * dv[q] + k.b * y2[q] + k.c;
        depthwise_backward(sc.a1, cheap_weight + j * taps, dv, tap_partials.data() + (n * s.cheap + j) * taps,
                           sc.a1_grad);
      }
      T* a1_grad = sc.a1_grad_sum.data();
      sc.a1_grad.sum_into(a1_grad);
      const T* go = grad_out + (n * s.oup + c) * size;
      T* dst = y1_grad_data + plane * size;
      if (gate == nullptr) {
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dst[q] = activation_backward(go[q] + a1_grad[q], a1[q], relu);
      } else {
        gate->values(n, c, 0, s.height, sc.gate.data());
        const T* gv = sc.gate.data();
        T* product = sc.product.data();
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) {
          dst[q] = activation_backward(go[q] * gv[q] + a1_grad[q], a1[q], relu);
          product[q] = go[q] * a1[q];
        }
        gate_grad(*gate, product, n, c, dgate);
      }
      primary_partials[plane] = grad_sums_of(dst, y, g.primary_bn.mean[c], size);
      if (!training) {
        const T scale = eval_primary[c].a;
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dst[q] *= scale;
      }
    }
  });

  const std::vector<GradSums> primary_sums = combine_planes(primary_partials, s.batch, s.init);
  if (training) {
    const std::vector<BatchNormGrad<T>> k = backward_coefficients<T>(g.primary_bn, primary_sums, count, true);
    at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const BatchNormGrad<T> kc = k[plane % s.init];
        T* dst = y1_grad_data + plane * size;
        const T* y = y1 + plane * size;
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dst[q] = kc.a * dst[q] + kc.b * y[q] + kc.c;
      }
    });
  }

  GhostGrads grads;
  grads.x = conv1x1(y1_grad, g.primary_weight.t());
  grads.primary_weight = conv1x1_weight_grad(y1_grad, g.x);
  grads.cheap_weight = combine_tap_partials(tap_partials, s.batch, s.cheap, taps, g.x.options());
  batch_norm_param_grads(g.primary_bn, primary_sums, grads.primary_bn_weight, grads.primary_bn_bias);
  batch_norm_param_grads(g.cheap_bn, combine_planes(cheap_partials, s.batch, s.cheap), grads.cheap_bn_weight,
                         grads.cheap_bn_bias);
  return grads;
}

#define GHOSTFUSED_INSTANTIATE(T)                                                                               \
  template GhostBranch<T> ghost_branch<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, BatchNorm,    \
                                          BatchNorm, const GhostSizes&, bool, bool);                             \
  template void ghost_write<T>(const GhostBranch<T>&, const Gate<T>*, T*);                                       \
  template GhostGrads ghost_backward<T>(const GhostBranch<T>&, const T*, const Gate<T>*, T*, bool);
GHOSTFUSED_INSTANTIATE(float)
GHOSTFUSED_INSTANTIATE(double)
#undef GHOSTFUSED_INSTANTIATE

namespace {

constexpr const char* kForward = "ghostfused_C::ghost_concat_forward";
constexpr const char* kBackward = "ghostfused_C::ghost_concat_backward";

GhostSizes check_arguments(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                           const at::Tensor& cheap_weight, at::TensorList bn_weight, at::TensorList bn_bias,
                           at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup,
                           bool training) {
  const GhostSizes s = check_ghost_arguments(op, x, primary_weight, cheap_weight, oup);
  check_batch_norms(op, x, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, {s.init, s.cheap});
  check_training_count(op, s.batch * s.height * s.width, training);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_concat_forward(
    const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight, at::TensorList bn_weight,
    at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup,
    bool relu, bool training) {
  const GhostSizes s = check_arguments(kForward, x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var,
                                       bn_eps, oup, training);
  std::vector<BatchNorm> bns = batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps);
  const at::ScalarType dtype = compute_dtype(x);
  at::Tensor out = empty_output({s.batch, s.oup, s.height, s.width}, x.options().dtype(dtype));
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ghost_concat_forward", [&] {
    const GhostBranch<scalar_t> g =
        ghost_branch<scalar_t>(x, primary_weight, cheap_weight, bns[0], bns[1], s, relu, training);
    ghost_write<scalar_t>(g, nullptr, out.data_ptr<scalar_t>());
    std::tie(mean, var) = packed_statistics({&g.primary_bn, &g.cheap_bn}, x);
  });
  return {as_output(out, x), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_concat_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
    at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
    at::ArrayRef<double> bn_eps, int64_t oup, bool relu, bool training) {
  const GhostSizes s = check_arguments(kBackward, x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean,
                                       bn_var, bn_eps, oup, training);
  check_grad_out(kBackward, grad_out, x, s.oup);
  std::vector<BatchNorm> bns = batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps);
  const at::ScalarType dtype = compute_dtype(x);
  const at::Tensor grad = dense(grad_out, dtype);
  GhostGrads grads;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ghost_concat_backward", [&] {
    const GhostBranch<scalar_t> g =
        ghost_branch<scalar_t>(x, primary_weight, cheap_weight, bns[0], bns[1], s, relu, false);
    grads = ghost_backward<scalar_t>(g, grad.data_ptr<scalar_t>(), nullptr, nullptr, training);
  });
  return {grads.x.view(x.sizes()).to(x.scalar_type()),
          grads.primary_weight.view(primary_weight.sizes()).to(x.scalar_type()),
          grads.cheap_weight.view(cheap_weight.sizes()).to(x.scalar_type()),
          packed({grads.primary_bn_weight, grads.cheap_bn_weight}, x),
          packed({grads.primary_bn_bias, grads.cheap_bn_bias}, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CPU, m) {
  m.impl("ghost_concat_forward", &ghost_concat_forward);
  m.impl("ghost_concat_backward", &ghost_concat_backward);
}

}  // namespace ghostfused::cpu
