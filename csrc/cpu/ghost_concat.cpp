// ghost_concat on the CPU: the primary 1x1 convolution as one GEMM over the batch, then fused passes per primary
// channel plane that apply BatchNorm and the activation, run the cheap depthwise convolution of every cheap
// channel reading that plane, and write both branches straight into their channel ranges of the output.
#include "ghost_concat.h"

#include <torch/library.h>

namespace ghostfused::cpu {
namespace {

// Grid rows per block of the fused write: a block's rows stay in L1 between the cheap convolution and the write.
constexpr int64_t kGridBlock = 4096;

// Rows [begin, end) of act(BN0(y1)) into the padded plane.
template <typename T>
void primary_rows(const T* y, int64_t width, int64_t begin, int64_t end, Affine<T> bn, bool relu,
                  PaddedPlane<T>& plane) {
  for (int64_t i = begin; i < end; ++i) {
    const T* src = y + i * width;
    T* dst = plane.row(i);
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) dst[j] = activate(bn.scale * src[j] + bn.shift, relu);
  }
}

// dst[j] = values[j] * gate_row[j], or values[j] without a gate.
template <typename T>
void store_row(const T* values, const T* gate_row, T* dst, int64_t width) {
  if (gate_row == nullptr) {
    std::copy(values, values + width, dst);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) dst[j] = values[j] * gate_row[j];
}

// The number of cheap channels of primary channel c that land in the output (the others are dropped by [:oup]).
int64_t kept_cheap_channels(const GhostSizes& s, int64_t c) {
  return std::clamp<int64_t>(s.oup - s.init - c * s.multiplier, 0, s.multiplier);
}

// Per-thread buffers of the passes.
template <typename T>
struct Scratch {
  PaddedPlane<T> a1;        // act(BN0(y1)) of the current primary plane, zero-padded by dw / 2
  PaddedPlane<T> a1_grad;   // its gradient from the cheap convolutions (backward)
  std::vector<T> grid;      // a cheap convolution's output on the grid
  std::vector<T> grid_grad; // its gradient (backward)
  std::vector<T> gate_row, gate_product, gate_scratch;

  Scratch(const GhostSizes& s, int64_t grid_rows, bool backward, int64_t gate_width)
      : a1(s.height, s.width, s.dw / 2, s.dw / 2),
        a1_grad(backward ? s.height : 0, backward ? s.width : 0, s.dw / 2, s.dw / 2),
        grid(grid_rows * a1.stride), grid_grad(backward ? grid_rows * a1.stride : 0), gate_row(s.width),
        gate_product(s.width), gate_scratch(gate_width) {}
};

template <typename T>
std::vector<Moments> cheap_moments(const GhostBranch<T>& g) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, taps = s.dw * s.dw;
  const T* y1 = g.y1.template data_ptr<T>();
  const T* cheap_weight = g.cheap_weight.template data_ptr<T>();
  std::vector<Moments> partials(s.batch * s.cheap);
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, false, 0);
    const int64_t stride = sc.a1.stride;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      primary_rows(y1 + plane * size, s.width, 0, s.height, g.primary_affine[c], g.relu, sc.a1);
      for (int64_t r = 0; r < s.multiplier; ++r) {
        const int64_t j = c * s.multiplier + r;
        depthwise_grid(sc.a1.grid_origin(), stride, s.dw, s.dw, cheap_weight + j * taps, sc.grid.data(),
                       s.height * stride);
        partials[n * s.cheap + j] = block_moments(sc.grid.data(), s.height, s.width, stride);
      }
    }
  });
  return combine_planes(partials, s.batch, s.cheap);
}

// Cheap channel j of sample n, given a1 in sc.a1: its convolution y2 into sc.grid and the gradient of its
// BatchNorm's output into sc.grid_grad (zero on the grid's discarded columns). Returns the BatchNorm backward's
// sums; with dgate, adds the gate's gradient (grad_out * the ungated output) into the gate plane.
template <typename T>
GradSums cheap_channel_grad(const GhostBranch<T>& g, int64_t n, int64_t j, const T* grad_out, const Gate<T>* gate,
                            T* dgate, Scratch<T>& sc) {
  const GhostSizes& s = g.sizes;
  const int64_t och = s.init + j, stride = sc.a1.stride;
  depthwise_grid(sc.a1.grid_origin(), stride, s.dw, s.dw, g.cheap_weight.template data_ptr<T>() + j * s.dw * s.dw,
                 sc.grid.data(), s.height * stride);
  const Affine<T> bn = g.cheap_affine[j];
  const double mean = g.cheap_bn.mean[j];
  GradSums sums{0, 0};
  for (int64_t i = 0; i < s.height; ++i) {
    const T* y2 = sc.grid.data() + i * stride;
    T* dv = sc.grid_grad.data() + i * stride;
    const T* go = grad_out + ((n * s.oup + och) * s.height + i) * s.width;
    if (gate != nullptr) gate->upsample.expand_row(gate->plane(n, och), i, sc.gate_row.data(), sc.gate_scratch.data());
    for (int64_t col = 0; col < s.width; ++col) {
      const T a2 = activate(bn.scale * y2[col] + bn.shift, g.relu);
      const T grad = gate != nullptr ? go[col] * sc.gate_row[col] : go[col];
      dv[col] = activation_backward(grad, a2, g.relu);
      sc.gate_product[col] = go[col] * a2;
    }
    std::fill(dv + s.width, dv + stride, T(0));
    double dy = 0, dy_centered = 0;
#pragma omp simd reduction(+ : dy, dy_centered)
    for (int64_t col = 0; col < s.width; ++col) {
      dy += static_cast<double>(dv[col]);
      dy_centered += static_cast<double>(dv[col]) * (static_cast<double>(y2[col]) - mean);
    }
    sums = sums + GradSums{dy, dy_centered};
    if (dgate != nullptr) {
      const int64_t gate_size = gate->upsample.h * gate->upsample.w;
      gate->upsample.reduce_row(sc.gate_product.data(), i, dgate + (n * s.oup + och) * gate_size,
                                sc.gate_scratch.data());
    }
  }
  return sums;
}

// The cheap BatchNorm's backward sums over the batch (training only: its coefficients depend on them).
template <typename T>
std::vector<GradSums> cheap_grad_sums(const GhostBranch<T>& g, const T* grad_out, const Gate<T>* gate) {
  const GhostSizes& s = g.sizes;
  const T* y1 = g.y1.template data_ptr<T>();
  std::vector<GradSums> partials(s.batch * s.cheap, GradSums{0, 0});
  const int64_t gate_width = gate != nullptr ? gate->upsample.w : 0;
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, true, gate_width);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      const int64_t kept = kept_cheap_channels(s, c);
      if (kept == 0) continue;
      primary_rows(y1 + plane * s.height * s.width, s.width, 0, s.height, g.primary_affine[c], g.relu, sc.a1);
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
  const int64_t block = std::max<int64_t>(1, kGridBlock / (s.width + 2 * pad));
  const int64_t gate_width = gate != nullptr ? gate->upsample.w : 0;
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, std::min(block, s.height), false, gate_width);
    const int64_t stride = sc.a1.stride;
    T* gate_row = gate != nullptr ? sc.gate_row.data() : nullptr;
    auto store = [&](const T* values, int64_t n, int64_t channel, int64_t i) {
      if (gate != nullptr) gate->upsample.expand_row(gate->plane(n, channel), i, gate_row, sc.gate_scratch.data());
      store_row(values, gate_row, out + ((n * s.oup + channel) * s.height + i) * s.width, s.width);
    };
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      const int64_t kept = kept_cheap_channels(s, c);
      int64_t ready = 0;  // rows of a1 computed (and written to the output) so far
      for (int64_t row0 = 0; row0 < s.height; row0 += block) {
        const int64_t row1 = std::min(s.height, row0 + block);
        const int64_t needed = kept > 0 ? std::min(s.height, row1 + pad) : row1;
        primary_rows(y1 + plane * size, s.width, ready, needed, g.primary_affine[c], g.relu, sc.a1);
        for (int64_t i = ready; i < needed; ++i) store(sc.a1.row(i), n, c, i);
        ready = needed;
        for (int64_t r = 0; r < kept; ++r) {
          const int64_t j = c * s.multiplier + r;
          const Affine<T> bn = g.cheap_affine[j];
          depthwise_grid(sc.a1.grid_origin() + row0 * stride, stride, s.dw, s.dw, cheap_weight + j * taps,
                         sc.grid.data(), (row1 - row0) * stride);
          for (int64_t i = row0; i < row1; ++i) {
            T* values = sc.grid.data() + (i - row0) * stride;
#pragma omp simd
            for (int64_t col = 0; col < s.width; ++col) values[col] = activate(bn.scale * values[col] + bn.shift, g.relu);
            store(values, n, s.init + j, i);
          }
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
  const int64_t gate_width = gate != nullptr ? gate->upsample.w : 0;
  const int64_t gate_size = gate != nullptr ? gate->upsample.h * gate->upsample.w : 0;
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, true, gate_width);
    const int64_t stride = sc.a1.stride;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      const int64_t kept = kept_cheap_channels(s, c);
      const T* y = y1 + plane * size;
      primary_rows(y, s.width, 0, s.height, g.primary_affine[c], g.relu, sc.a1);
      sc.a1_grad.zero();
      if (dgate != nullptr) {
        std::fill(dgate + (n * s.oup + c) * gate_size, dgate + (n * s.oup + c + 1) * gate_size, T(0));
        for (int64_t r = 0; r < kept; ++r) {
          const int64_t och = s.init + c * s.multiplier + r;
          std::fill(dgate + (n * s.oup + och) * gate_size, dgate + (n * s.oup + och + 1) * gate_size, T(0));
        }
      }
      for (int64_t r = 0; r < kept; ++r) {
        const int64_t j = c * s.multiplier + r;
        cheap_partials[n * s.cheap + j] = cheap_channel_grad(g, n, j, grad_out, gate, dgate, sc);
        const BatchNormGrad<T> k = cheap_coefficients[j];
        for (int64_t i = 0; i < s.height; ++i) {
          T* dv = sc.grid_grad.data() + i * stride;
          const T* y2 = sc.grid.data() + i * stride;
#pragma omp simd
          for (int64_t col = 0; col < s.width; ++col) dv[col] = k.a * dv[col] + k.b * y2[col] + k.c;
        }
        depthwise_grid_weight_grad(sc.grid_grad.data(), sc.a1.grid_origin(), stride, s.dw, s.dw, s.height * stride,
                                   tap_partials.data() + (n * s.cheap + j) * taps);
        depthwise_grid_transpose(sc.grid_grad.data(), stride, s.dw, s.dw, cheap_weight + j * taps,
                                 sc.a1_grad.grid_origin(), s.height * stride);
      }
      const double mean = g.primary_bn.mean[c];
      const T scale = training ? T(1) : eval_primary[c].a;
      GradSums sums{0, 0};
      for (int64_t i = 0; i < s.height; ++i) {
        const T* a1 = sc.a1.row(i);
        const T* a1_grad = sc.a1_grad.row(i);
        const T* go = grad_out + ((n * s.oup + c) * s.height + i) * s.width;
        const T* yrow = y + i * s.width;
        T* dst = y1_grad_data + plane * size + i * s.width;
        if (gate != nullptr) gate->upsample.expand_row(gate->plane(n, c), i, sc.gate_row.data(), sc.gate_scratch.data());
        for (int64_t col = 0; col < s.width; ++col) {
          const T grad = (gate != nullptr ? go[col] * sc.gate_row[col] : go[col]) + a1_grad[col];
          dst[col] = activation_backward(grad, a1[col], g.relu);
          sc.gate_product[col] = go[col] * a1[col];
        }
        double dy = 0, dy_centered = 0;
#pragma omp simd reduction(+ : dy, dy_centered)
        for (int64_t col = 0; col < s.width; ++col) {
          dy += static_cast<double>(dst[col]);
          dy_centered += static_cast<double>(dst[col]) * (static_cast<double>(yrow[col]) - mean);
        }
        sums = sums + GradSums{dy, dy_centered};
        if (!training) {
#pragma omp simd
          for (int64_t col = 0; col < s.width; ++col) dst[col] *= scale;
        }
        if (dgate != nullptr)
          gate->upsample.reduce_row(sc.gate_product.data(), i, dgate + (n * s.oup + c) * gate_size,
                                    sc.gate_scratch.data());
      }
      primary_partials[plane] = sums;
    }
  });

  const std::vector<GradSums> primary_sums = combine_planes(primary_partials, s.batch, s.init);
  if (training) {
    const std::vector<BatchNormGrad<T>> k = backward_coefficients<T>(g.primary_bn, primary_sums, count, true);
    for_each_plane(s.batch * s.init, [&](int64_t plane) {
      const BatchNormGrad<T> kc = k[plane % s.init];
      T* dst = y1_grad_data + plane * size;
      const T* y = y1 + plane * size;
#pragma omp simd
      for (int64_t q = 0; q < size; ++q) dst[q] = kc.a * dst[q] + kc.b * y[q] + kc.c;
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
