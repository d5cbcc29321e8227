// dfc_attention on the CPU: the gate at quarter resolution (pooling, one GEMM over the batch, per-plane passes
// for the depthwise convolutions, BatchNorms and sigmoid), then one pass that writes features times the
// upsampled gate.
#include "dfc_attention.h"

#include <torch/library.h>

namespace ghostfused::cpu {
namespace {

template <typename T>
at::Tensor average_pool(const at::Tensor& x, int64_t batch, int64_t channels, int64_t height, int64_t width) {
  const int64_t h = pooled_size(height), w = pooled_size(width);
  at::Tensor pooled = at::empty({batch, channels, h * w}, x.options());
  const T* src = x.template data_ptr<T>();
  T* dst = pooled.template data_ptr<T>();
  for_each_plane(batch * channels, [&](int64_t plane) {
    for (int64_t i = 0; i < h; ++i) {
      const T* top = src + plane * height * width + 2 * i * width;
      const T* bottom = top + width;
      T* out = dst + plane * h * w + i * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j)
        out[j] = average_2x2(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
    }
  });
  return pooled;
}

// Per-thread buffers of the per-plane stages: u = BN(z) zero-padded for the horizontal (1, K) and vertical (K, 1)
// convolutions, their gradients, and grid outputs.
template <typename T>
struct Scratch {
  PaddedPlane<T> horizontal, vertical, horizontal_grad, vertical_grad;
  std::vector<T> grid, z1, z2;

  Scratch(int64_t h, int64_t w, int64_t k, bool backward)
      : horizontal(h, w, 0, k / 2), vertical(h, w, k / 2, 0), horizontal_grad(backward ? h : 0, w, 0, k / 2),
        vertical_grad(backward ? h : 0, w, k / 2, 0), grid(h * horizontal.stride), z1(h * w), z2(h * w) {}
};

// z1 = horizontal (1, K) convolution of BN(z0), one [h, w] plane.
template <typename T>
void horizontal_stage(const T* z0, Affine<T> bn, const T* taps, int k, Scratch<T>& sc, T* z1) {
  PaddedPlane<T>& u = sc.horizontal;
  for (int64_t i = 0; i < u.rows; ++i) {
    const T* src = z0 + i * u.cols;
    T* dst = u.row(i);
#pragma omp simd
    for (int64_t j = 0; j < u.cols; ++j) dst[j] = bn.scale * src[j] + bn.shift;
  }
  depthwise_grid(u.grid_origin(), u.stride, 1, k, taps, sc.grid.data(), u.rows * u.stride);
  for (int64_t i = 0; i < u.rows; ++i)
    std::copy(sc.grid.data() + i * u.stride, sc.grid.data() + i * u.stride + u.cols, z1 + i * u.cols);
}

// z2 = vertical (K, 1) convolution of BN(z1), one [h, w] plane (the grid has no discarded columns).
template <typename T>
void vertical_stage(const T* z1, Affine<T> bn, const T* taps, int k, Scratch<T>& sc, T* z2) {
  PaddedPlane<T>& u = sc.vertical;
  const int64_t size = u.rows * u.cols;
  T* dst = u.row(0);
#pragma omp simd
  for (int64_t q = 0; q < size; ++q) dst[q] = bn.scale * z1[q] + bn.shift;
  depthwise_grid(u.grid_origin(), u.stride, k, 1, taps, z2, size);
}

template <typename T>
void gate_stage(const T* z2, Affine<T> bn, int64_t size, T* gate) {
#pragma omp simd
  for (int64_t q = 0; q < size; ++q) gate[q] = sigmoid(bn.scale * z2[q] + bn.shift);
}

// out = features * the upsampled gate, each plane row by row.
template <typename T>
void features_forward(const Gate<T>& gate, const T* features, int64_t batch, T* out) {
  const Upsample<T>& up = gate.upsample;
  for_each_plane(batch * gate.channels, [&](int64_t plane) {
    std::vector<T> gate_row(up.W), scratch(up.w);
    for (int64_t i = 0; i < up.H; ++i) {
      const int64_t offset = (plane * up.H + i) * up.W;
      up.expand_row(gate.data + plane * up.h * up.w, i, gate_row.data(), scratch.data());
#pragma omp simd
      for (int64_t j = 0; j < up.W; ++j) out[offset + j] = features[offset + j] * gate_row[j];
    }
  });
}

// dgate[n, c] = features * dout reduced to the gate's resolution, dfeatures = dout * upsampled gate.
template <typename T>
void features_backward(const Gate<T>& gate, const T* grad_out, const T* features, int64_t batch, T* dfeatures,
                       T* dgate) {
  const Upsample<T>& up = gate.upsample;
  for_each_plane(batch * gate.channels, [&](int64_t plane) {
    std::vector<T> gate_row(up.W), product(up.W), scratch(up.w);
    T* dplane = dgate + plane * up.h * up.w;
    std::fill(dplane, dplane + up.h * up.w, T(0));
    for (int64_t i = 0; i < up.H; ++i) {
      const int64_t offset = (plane * up.H + i) * up.W;
      up.expand_row(gate.data + plane * up.h * up.w, i, gate_row.data(), scratch.data());
#pragma omp simd
      for (int64_t j = 0; j < up.W; ++j) {
        dfeatures[offset + j] = grad_out[offset + j] * gate_row[j];
        product[j] = grad_out[offset + j] * features[offset + j];
      }
      up.reduce_row(product.data(), i, dplane, scratch.data());
    }
  });
}

}  // namespace

template <typename T>
DfcGate<T> dfc_gate(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                    const at::Tensor& vertical_weight, std::vector<BatchNorm> bns, const DfcSizes& sizes,
                    bool batch_statistics, bool keep_intermediates) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<T>::value;
  DfcGate<T> g;
  g.sizes = sizes;
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  const int64_t channels = sizes.channels, k = sizes.kernel, h = sizes.pooled_h, w = sizes.pooled_w, size = h * w;
  g.conv_weight = dense(conv_weight, dtype).view({channels, g.in_channels});
  g.horizontal_weight = dense(horizontal_weight, dtype).view({channels, k});
  g.vertical_weight = dense(vertical_weight, dtype).view({channels, k});
  g.bns = std::move(bns);
  g.pooled = average_pool<T>(dense(x, dtype), g.batch, g.in_channels, g.height, g.width);
  g.z0 = conv1x1(g.pooled, g.conv_weight);
  g.gate = at::empty({g.batch, channels, h, w}, g.z0.options());
  const int64_t planes = g.batch * channels;
  const T* z0 = g.z0.template data_ptr<T>();
  const T* htaps = g.horizontal_weight.template data_ptr<T>();
  const T* vtaps = g.vertical_weight.template data_ptr<T>();
  T* gate = g.gate.template data_ptr<T>();
  if (batch_statistics) set_batch_statistics(g.bns[0], channel_moments(z0, g.batch, channels, size));
  g.affine[0] = folded<T>(g.bns[0]);

  if (!batch_statistics && !keep_intermediates) {  // inference: every stage of a plane in one go
    g.affine[1] = folded<T>(g.bns[1]);
    g.affine[2] = folded<T>(g.bns[2]);
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> sc(h, w, k, false);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % channels;
        horizontal_stage(z0 + plane * size, g.affine[0][c], htaps + c * k, k, sc, sc.z1.data());
        vertical_stage(sc.z1.data(), g.affine[1][c], vtaps + c * k, k, sc, sc.z2.data());
        gate_stage(sc.z2.data(), g.affine[2][c], size, gate + plane * size);
      }
    });
    return g;
  }

  // Stage by stage, each BatchNorm's statistics complete before the next stage uses them.
  std::vector<Moments> partials(planes);
  g.z1 = at::empty_like(g.z0);
  T* z1 = g.z1.template data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(h, w, k, false);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % channels;
      horizontal_stage(z0 + plane * size, g.affine[0][c], htaps + c * k, k, sc, z1 + plane * size);
      if (batch_statistics) partials[plane] = block_moments(z1 + plane * size, 1, size, size);
    }
  });
  if (batch_statistics) set_batch_statistics(g.bns[1], combine_planes(partials, g.batch, channels));
  g.affine[1] = folded<T>(g.bns[1]);

  g.z2 = at::empty_like(g.z0);
  T* z2 = g.z2.template data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(h, w, k, false);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % channels;
      vertical_stage(z1 + plane * size, g.affine[1][c], vtaps + c * k, k, sc, z2 + plane * size);
      if (batch_statistics) partials[plane] = block_moments(z2 + plane * size, 1, size, size);
    }
  });
  if (batch_statistics) set_batch_statistics(g.bns[2], combine_planes(partials, g.batch, channels));
  g.affine[2] = folded<T>(g.bns[2]);

  for_each_plane(planes, [&](int64_t plane) {
    gate_stage(z2 + plane * size, g.affine[2][plane % channels], size, gate + plane * size);
  });
  return g;
}

template <typename T>
DfcGrads dfc_gate_backward(const DfcGate<T>& g, const T* dgate, bool training) {
  const int64_t channels = g.sizes.channels, k = g.sizes.kernel, h = g.sizes.pooled_h, w = g.sizes.pooled_w;
  const int64_t size = h * w, planes = g.batch * channels;
  const double count = static_cast<double>(g.batch * size);
  const T* z0 = g.z0.template data_ptr<T>();
  const T* z1 = g.z1.template data_ptr<T>();
  const T* z2 = g.z2.template data_ptr<T>();
  const T* gate = g.gate.template data_ptr<T>();
  const T* htaps = g.horizontal_weight.template data_ptr<T>();
  const T* vtaps = g.vertical_weight.template data_ptr<T>();
  std::vector<GradSums> partials(planes);
  std::vector<GradSums> sums[3];
  auto reduce = [&](int index) {
    sums[index] = combine_planes(partials, g.batch, channels);
    return backward_coefficients<T>(g.bns[index], sums[index], count, training);
  };
  auto plane_sums = [](const T* grad, const T* z, int64_t size, double mean) {
    double dy = 0, dy_centered = 0;
#pragma omp simd reduction(+ : dy, dy_centered)
    for (int64_t q = 0; q < size; ++q) {
      dy += static_cast<double>(grad[q]);
      dy_centered += static_cast<double>(grad[q]) * (static_cast<double>(z[q]) - mean);
    }
    return GradSums{dy, dy_centered};
  };

  // The sigmoid and the vertical BatchNorm: sums for its coefficients.
  for_each_plane(planes, [&](int64_t plane) {
    std::vector<T> du2(size);
    for (int64_t q = 0; q < size; ++q) du2[q] = sigmoid_backward(dgate[plane * size + q], gate[plane * size + q]);
    partials[plane] = plane_sums(du2.data(), z2 + plane * size, size, g.bns[2].mean[plane % channels]);
  });
  const std::vector<BatchNormGrad<T>> k2 = reduce(2);

  // The vertical convolution: its weight gradient and u1's gradient (u1 = BN1(z1)), then the horizontal BN's sums.
  at::Tensor grad_a = at::empty_like(g.z0), grad_b = at::empty_like(g.z0);
  T* du1 = grad_a.template data_ptr<T>();
  std::vector<double> vertical_partials(planes * k, 0.0), horizontal_partials(planes * k, 0.0);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(h, w, k, true);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % channels;
      const Affine<T> bn1 = g.affine[1][c];
      const BatchNormGrad<T> kc = k2[c];
      T* dz2 = sc.z2.data();
      for (int64_t q = 0; q < size; ++q) {
        const T du2 = sigmoid_backward(dgate[plane * size + q], gate[plane * size + q]);
        dz2[q] = kc.a * du2 + kc.b * z2[plane * size + q] + kc.c;
      }
      PaddedPlane<T>& u1 = sc.vertical;
      T* u1_rows = u1.row(0);
      for (int64_t q = 0; q < size; ++q) u1_rows[q] = bn1.scale * z1[plane * size + q] + bn1.shift;
      depthwise_grid_weight_grad(dz2, u1.grid_origin(), u1.stride, k, 1, size, vertical_partials.data() + plane * k);
      sc.vertical_grad.zero();
      depthwise_grid_transpose(dz2, u1.stride, k, 1, vtaps + c * k, sc.vertical_grad.grid_origin(), size);
      std::copy(sc.vertical_grad.row(0), sc.vertical_grad.row(0) + size, du1 + plane * size);
      partials[plane] = plane_sums(du1 + plane * size, z1 + plane * size, size, g.bns[1].mean[c]);
    }
  });
  const std::vector<BatchNormGrad<T>> k1 = reduce(1);

  // The horizontal convolution: its weight gradient and u0's gradient, then the conv BN's sums.
  T* du0 = grad_b.template data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(h, w, k, true);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % channels;
      const Affine<T> bn0 = g.affine[0][c];
      const BatchNormGrad<T> kc = k1[c];
      PaddedPlane<T>& u0 = sc.horizontal;
      const int64_t stride = u0.stride;
      T* dz1 = sc.grid.data();  // on the horizontal grid, zero in the discarded columns
      std::fill(sc.grid.begin(), sc.grid.end(), T(0));
      for (int64_t i = 0; i < h; ++i) {
        T* u = u0.row(i);
        for (int64_t j = 0; j < w; ++j) {
          const int64_t q = plane * size + i * w + j;
          u[j] = bn0.scale * z0[q] + bn0.shift;
          dz1[i * stride + j] = kc.a * du1[q] + kc.b * z1[q] + kc.c;
        }
      }
      depthwise_grid_weight_grad(dz1, u0.grid_origin(), stride, 1, k, h * stride,
                                 horizontal_partials.data() + plane * k);
      sc.horizontal_grad.zero();
      depthwise_grid_transpose(dz1, stride, 1, k, htaps + c * k, sc.horizontal_grad.grid_origin(), h * stride);
      for (int64_t i = 0; i < h; ++i)
        std::copy(sc.horizontal_grad.row(i), sc.horizontal_grad.row(i) + w, du0 + plane * size + i * w);
      partials[plane] = plane_sums(du0 + plane * size, z0 + plane * size, size, g.bns[0].mean[c]);
    }
  });
  const std::vector<BatchNormGrad<T>> k0 = reduce(0);

  // dz0 in place, then the 1x1 convolution's gradients.
  for_each_plane(planes, [&](int64_t plane) {
    const BatchNormGrad<T> kc = k0[plane % channels];
    T* d = du0 + plane * size;
    const T* z = z0 + plane * size;
#pragma omp simd
    for (int64_t q = 0; q < size; ++q) d[q] = kc.a * d[q] + kc.b * z[q] + kc.c;
  });

  DfcGrads grads;
  grads.pooled = conv1x1(grad_b, g.conv_weight.t());
  grads.conv_weight = conv1x1_weight_grad(grad_b, g.pooled);
  grads.horizontal_weight = combine_tap_partials(horizontal_partials, g.batch, channels, k, g.z0.options());
  grads.vertical_weight = combine_tap_partials(vertical_partials, g.batch, channels, k, g.z0.options());
  grads.bn_weight.resize(3);
  grads.bn_bias.resize(3);
  for (int i = 0; i < 3; ++i) batch_norm_param_grads(g.bns[i], sums[i], grads.bn_weight[i], grads.bn_bias[i]);
  return grads;
}

template <typename T>
void pool_backward(const at::Tensor& pooled_grad, int64_t height, int64_t width, T* dx, bool accumulate) {
  const int64_t h = pooled_size(height), w = pooled_size(width);
  const int64_t planes = pooled_grad.size(0) * pooled_grad.size(1);
  const T* src = pooled_grad.template data_ptr<T>();
  for_each_plane(planes, [&](int64_t plane) {
    T* out = dx + plane * height * width;
    for (int64_t i = 0; i < height; ++i) {
      T* row = out + i * width;
      const T* grad = src + plane * h * w + (i / 2) * w;
      if (i >= 2 * h) {  // the row the pooling dropped
        if (!accumulate) std::fill(row, row + width, T(0));
        continue;
      }
      if (accumulate) {
#pragma omp simd
        for (int64_t j = 0; j < 2 * w; ++j) row[j] += grad[j / 2] * T(0.25);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < 2 * w; ++j) row[j] = grad[j / 2] * T(0.25);
        std::fill(row + 2 * w, row + width, T(0));
      }
    }
  });
}

#define GHOSTFUSED_INSTANTIATE(T)                                                                                \
  template DfcGate<T> dfc_gate<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                                  std::vector<BatchNorm>, const DfcSizes&, bool, bool);                          \
  template DfcGrads dfc_gate_backward<T>(const DfcGate<T>&, const T*, bool);                                     \
  template void pool_backward<T>(const at::Tensor&, int64_t, int64_t, T*, bool);
GHOSTFUSED_INSTANTIATE(float)
GHOSTFUSED_INSTANTIATE(double)
#undef GHOSTFUSED_INSTANTIATE

namespace {

constexpr const char* kForward = "ghostfused_C::dfc_attention_forward";
constexpr const char* kBackward = "ghostfused_C::dfc_attention_backward";

DfcSizes check_arguments(const char* op, const at::Tensor& x, const at::Tensor& features,
                         const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                         const at::Tensor& vertical_weight, at::TensorList bn_weight, at::TensorList bn_bias,
                         at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                         const std::string& upsample, bool training) {
  check_input(op, x);
  check_input(op, features, "features");
  const int64_t channels = features.size(1);
  const DfcSizes s = check_dfc_arguments(op, x, conv_weight, horizontal_weight, vertical_weight, channels, upsample);
  check_features(op, features, x, channels);
  check_batch_norms(op, x, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, {channels, channels, channels});
  check_training_count(op, x.size(0) * s.pooled_h * s.pooled_w, training);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dfc_attention_forward(
    const at::Tensor& x, const at::Tensor& features, const at::Tensor& conv_weight,
    const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight, at::TensorList bn_weight,
    at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
    c10::string_view upsample, bool training) {
  const DfcSizes s = check_arguments(kForward, x, features, conv_weight, horizontal_weight, vertical_weight, bn_weight,
                                     bn_bias, bn_mean, bn_var, bn_eps, std::string(upsample), training);
  const at::ScalarType dtype = compute_dtype(x);
  const at::Tensor xd = dense(x, dtype), feats = dense(features, dtype);
  at::Tensor out = empty_output(feats.sizes(), feats.options());
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES(dtype, "dfc_attention_forward", [&] {
    const DfcGate<scalar_t> g =
        dfc_gate<scalar_t>(xd, conv_weight, horizontal_weight, vertical_weight,
                           batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps), s, training, false);
    features_forward(g.view(), feats.data_ptr<scalar_t>(), g.batch, out.data_ptr<scalar_t>());
    std::tie(mean, var) = packed_statistics({&g.bns[0], &g.bns[1], &g.bns[2]}, x);
  });
  return {as_output(out, x), mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dfc_attention_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& features,
                       const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                       const at::Tensor& vertical_weight, at::TensorList bn_weight, at::TensorList bn_bias,
                       at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                       c10::string_view upsample, bool training) {
  const DfcSizes s = check_arguments(kBackward, x, features, conv_weight, horizontal_weight, vertical_weight,
                                     bn_weight, bn_bias, bn_mean, bn_var, bn_eps, std::string(upsample), training);
  check_grad_out(kBackward, grad_out, x, s.channels);
  const at::ScalarType dtype = compute_dtype(x);
  const at::Tensor xd = dense(x, dtype), feats = dense(features, dtype), grad = dense(grad_out, dtype);
  at::Tensor dfeatures = empty_output(feats.sizes(), feats.options());
  at::Tensor dx = empty_output(x.sizes(), feats.options());
  DfcGrads grads;
  AT_DISPATCH_FLOATING_TYPES(dtype, "dfc_attention_backward", [&] {
    const DfcGate<scalar_t> g =
        dfc_gate<scalar_t>(xd, conv_weight, horizontal_weight, vertical_weight,
                           batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps), s, false, true);
    at::Tensor dgate = at::empty_like(g.gate);
    features_backward(g.view(), grad.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(), g.batch,
                      dfeatures.data_ptr<scalar_t>(), dgate.data_ptr<scalar_t>());
    grads = dfc_gate_backward(g, dgate.data_ptr<scalar_t>(), training);
    pool_backward<scalar_t>(grads.pooled, g.height, g.width, dx.data_ptr<scalar_t>(), false);
  });
  const at::ScalarType out_dtype = x.scalar_type();
  return {dx.to(out_dtype),
          dfeatures.to(out_dtype),
          grads.conv_weight.view(conv_weight.sizes()).to(out_dtype),
          grads.horizontal_weight.view(horizontal_weight.sizes()).to(out_dtype),
          grads.vertical_weight.view(vertical_weight.sizes()).to(out_dtype),
          packed(grads.bn_weight, x),
          packed(grads.bn_bias, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CPU, m) {
  m.impl("dfc_attention_forward", &dfc_attention_forward);
  m.impl("dfc_attention_backward", &dfc_attention_backward);
}

}  // namespace ghostfused::cpu
