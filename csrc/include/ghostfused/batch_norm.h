// BatchNorm math shared by the CPU and CUDA kernels: folding into a per-channel affine map, batch statistics
// from per-block moments combined in a fixed order, and the coefficients of the backward pass.
#pragma once

#include <math.h>

#include "ghostfused/macros.h"

namespace ghostfused {

// y = scale * x + shift: a BatchNorm with fixed statistics.
template <typename Acc>
struct Affine {
  Acc scale, shift;
};

template <typename Acc>
GF_INLINE Acc inverse_std(Acc var, Acc eps) {
  return Acc(1) / sqrt(var + eps);
}

// BatchNorm with statistics (mean, var) folded: scale = weight / sqrt(var + eps), shift = bias - mean * scale.
template <typename Acc>
GF_INLINE Affine<Acc> fold_batch_norm(Acc weight, Acc bias, Acc mean, Acc var, Acc eps) {
  const Acc scale = weight * inverse_std(var, eps);
  return {scale, bias - mean * scale};
}

// Count, mean and sum of squared deviations of a block of values (Chan et al.'s parallel form). Blocks are
// combined in a fixed order, so statistics do not depend on how the work was split between threads.
struct Moments {
  double count, mean, m2;
};

GF_INLINE Moments combine(Moments a, Moments b) {
  const double count = a.count + b.count;
  if (count == 0) return a;
  const double delta = b.mean - a.mean;
  return {count, a.mean + delta * (b.count / count), a.m2 + b.m2 + delta * delta * (a.count * b.count / count)};
}

// The statistics a training BatchNorm normalises with: the mean and the biased variance. An empty batch has
// none: mean 0 and var 1 (never used to normalise anything).
GF_INLINE double moments_mean(Moments m) { return m.count > 0 ? m.mean : 0.0; }
GF_INLINE double moments_biased_var(Moments m) { return m.count > 0 ? m.m2 / m.count : 1.0; }

// The two per-channel sums a BatchNorm backward needs: sum(dy) and sum(dy * (x - mean)).
struct GradSums {
  double dy, dy_centered;
};

GF_INLINE GradSums operator+(GradSums a, GradSums b) { return {a.dy + b.dy, a.dy_centered + b.dy_centered}; }

// dx = a * dy + b * x + c for the BatchNorm y = weight * (x - mean) / sqrt(var + eps) + bias. In training the
// statistics are those of the batch (count values per channel) and the gradient flows through them; in eval they
// are constants and b = c = 0.
template <typename Acc>
struct BatchNormGrad {
  Acc a, b, c;
};

template <typename Acc>
GF_INLINE BatchNormGrad<Acc> batch_norm_backward(Acc weight, Acc mean, Acc var, Acc eps, GradSums sums,
                                                  double count, bool training) {
  const Acc inv = inverse_std(var, eps);
  const Acc a = weight * inv;
  if (!training || count == 0) return {a, Acc(0), Acc(0)};
  const Acc b = -a * inv * inv * static_cast<Acc>(sums.dy_centered / count);
  return {a, b, -a * static_cast<Acc>(sums.dy / count) - b * mean};
}

// Gradients of the BatchNorm's weight and bias.
template <typename Acc>
GF_INLINE Acc batch_norm_weight_grad(Acc var, Acc eps, GradSums sums) {
  return static_cast<Acc>(sums.dy_centered) * inverse_std(var, eps);
}

// ReLU and its backward as PyTorch computes them (NaN propagates forward; the backward masks where out <= 0).
template <typename T>
GF_INLINE T activate(T v, bool relu) {
  return relu && v < T(0) ? T(0) : v;
}

template <typename T>
GF_INLINE T activation_backward(T grad, T out, bool relu) {
  return relu && out <= T(0) ? T(0) : grad;
}

template <typename T>
GF_INLINE T sigmoid(T v) {
  return T(1) / (T(1) + exp(-v));
}

// d sigmoid(v) given the output g = sigmoid(v), in PyTorch's order.
template <typename T>
GF_INLINE T sigmoid_backward(T grad, T g) {
  return grad * (T(1) - g) * g;
}

}  // namespace ghostfused
