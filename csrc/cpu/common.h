// Building blocks of the CPU kernels (csrc/cpu/<op>.cpp): BatchNorm state on the host, per-plane statistics
// combined in a fixed order, depthwise convolutions on zero-padded planes, the gate's upsampling row by row, and
// the 1x1 convolutions as GEMMs.
//
// Layout: every kernel works on dense NCHW planes. A depthwise convolution reads a zero-padded copy of its input
// plane (PaddedPlane) and computes on the "grid": output (i, j) sits at q = i * stride + j with stride the padded
// width, so that each tap is one contiguous, vectorisable loop over q; the columns j >= width of the grid are
// discarded (or kept at zero where a backward reads them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../glue.h"
#include "ghostfused/batch_norm.h"
#include "ghostfused/depthwise.h"
#include "ghostfused/index_maps.h"

namespace ghostfused::cpu {

// float16 / bfloat16 inputs are computed in float32; float32 and float64 natively.
at::ScalarType compute_dtype(const at::Tensor& x);

// t in dtype, dense NCHW (a copy only when needed).
at::Tensor dense(const at::Tensor& t, at::ScalarType dtype);

// A kernel's output computed in NCHW and the compute dtype, returned in x's dtype and layout.
at::Tensor as_output(const at::Tensor& out, const at::Tensor& x);

// One BatchNorm's parameters and statistics on the host, in double.
struct BatchNorm {
  std::vector<double> weight, bias, mean, var;  // mean / var: the statistics it normalises with
  double eps;
};

// The op's BatchNorms from its schema lists; mean / var are bn_mean / bn_var (running or saved statistics).
std::vector<BatchNorm> batch_norms(at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                   at::TensorList bn_var, at::ArrayRef<double> bn_eps);

// Replace a BatchNorm's mean / var by the batch statistics of per-channel moments.
void set_batch_statistics(BatchNorm& bn, const std::vector<Moments>& moments);

// The op's packed statistics (stats_mean, stats_var), in the stats dtype of x.
std::tuple<at::Tensor, at::Tensor> packed_statistics(const std::vector<const BatchNorm*>& bns, const at::Tensor& x);

// A vector of doubles per BatchNorm, packed into one tensor in the stats dtype of x (the BatchNorm gradients).
at::Tensor packed(const std::vector<std::vector<double>>& values, const at::Tensor& x);

template <typename T>
std::vector<Affine<T>> folded(const BatchNorm& bn) {
  std::vector<Affine<T>> out(bn.weight.size());
  for (size_t c = 0; c < out.size(); ++c) {
    const Affine<double> a = fold_batch_norm(bn.weight[c], bn.bias[c], bn.mean[c], bn.var[c], bn.eps);
    out[c] = {static_cast<T>(a.scale), static_cast<T>(a.shift)};
  }
  return out;
}

// Per-channel backward coefficients (dx = a dy + b x + c) from the reduced sums over count values per channel.
template <typename T>
std::vector<BatchNormGrad<T>> backward_coefficients(const BatchNorm& bn, const std::vector<GradSums>& sums,
                                                    double count, bool training) {
  std::vector<BatchNormGrad<T>> out(bn.weight.size());
  for (size_t c = 0; c < out.size(); ++c) {
    const BatchNormGrad<double> g =
        batch_norm_backward(bn.weight[c], bn.mean[c], bn.var[c], bn.eps, sums[c], count, training);
    out[c] = {static_cast<T>(g.a), static_cast<T>(g.b), static_cast<T>(g.c)};
  }
  return out;
}

// The gradients of a BatchNorm's weight and bias from its reduced sums.
void batch_norm_param_grads(const BatchNorm& bn, const std::vector<GradSums>& sums, std::vector<double>& weight,
                            std::vector<double>& bias);

// partials[n * channels + c] combined over n = 0, 1, ... in order: per-channel results that do not depend on how
// the planes were split between threads.
std::vector<Moments> combine_planes(const std::vector<Moments>& partials, int64_t batch, int64_t channels);
std::vector<GradSums> combine_planes(const std::vector<GradSums>& partials, int64_t batch, int64_t channels);
// partials[(n * channels + c) * taps + t] summed over n: a depthwise weight gradient [channels, taps].
at::Tensor combine_tap_partials(const std::vector<double>& partials, int64_t batch, int64_t channels, int64_t taps,
                                const at::TensorOptions& options);

// Run body(plane) for plane in [0, count), split over the intra-op threads (at::parallel_for). Each plane is a
// task that writes its own outputs and partial sums only.
template <typename Body>
void for_each_plane(int64_t count, const Body& body) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) body(plane);
  });
}

// A zero-padded copy of one [rows, cols] plane: pad_rows / pad_cols zeros around it, plus slack at the end so that
// grid loops may run over whole padded rows. Only the interior is ever written, so the border stays zero.
template <typename T>
struct PaddedPlane {
  int64_t rows, cols, pad_rows, pad_cols, stride;
  std::vector<T> data;

  PaddedPlane(int64_t rows, int64_t cols, int64_t pad_rows, int64_t pad_cols)
      : rows(rows), cols(cols), pad_rows(pad_rows), pad_cols(pad_cols), stride(cols + 2 * pad_cols),
        data((rows + 2 * pad_rows) * stride + 2 * pad_cols + 1, T(0)) {}
  T* row(int64_t i) { return data.data() + (i + pad_rows) * stride + pad_cols; }
  const T* row(int64_t i) const { return data.data() + (i + pad_rows) * stride + pad_cols; }
  // Grid position q = i * stride + j reads tap (a, b) at grid_origin()[q + a * stride + b].
  T* grid_origin() { return data.data(); }
  const T* grid_origin() const { return data.data(); }
  void zero() { std::fill(data.begin(), data.end(), T(0)); }
};

// out[q] = sum over taps (a, b) of taps[a * kw + b] * in[q + a * stride + b], q in [0, count); taps accumulate in
// row-major order (ghostfused/depthwise.h).
template <typename T>
void depthwise_grid(const T* in, int64_t stride, int kh, int kw, const T* taps, T* out, int64_t count) {
  {
    const T w = taps[0];
#pragma omp simd
    for (int64_t q = 0; q < count; ++q) out[q] = w * in[q];
  }
  for (int t = 1; t < kh * kw; ++t) {
    const T w = taps[t];
    const T* src = in + (t / kw) * stride + t % kw;
#pragma omp simd
    for (int64_t q = 0; q < count; ++q) out[q] += w * src[q];
  }
}

// The transposed convolution: in_grad[q + a * stride + b] += taps[a * kw + b] * grad[q].
template <typename T>
void depthwise_grid_transpose(const T* grad, int64_t stride, int kh, int kw, const T* taps, T* in_grad,
                              int64_t count) {
  for (int t = 0; t < kh * kw; ++t) {
    const T w = taps[t];
    T* dst = in_grad + (t / kw) * stride + t % kw;
#pragma omp simd
    for (int64_t q = 0; q < count; ++q) dst[q] += w * grad[q];
  }
}

// taps_grad[a * kw + b] += sum over q of grad[q] * in[q + a * stride + b], in double.
template <typename T>
void depthwise_grid_weight_grad(const T* grad, const T* in, int64_t stride, int kh, int kw, int64_t count,
                                double* taps_grad) {
  for (int t = 0; t < kh * kw; ++t) {
    const T* src = in + (t / kw) * stride + t % kw;
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t q = 0; q < count; ++q) sum += static_cast<double>(grad[q]) * static_cast<double>(src[q]);
    taps_grad[t] += sum;
  }
}

// Moments of a [rows, cols] block with row stride `stride`, two passes in double.
template <typename T>
Moments block_moments(const T* data, int64_t rows, int64_t cols, int64_t stride) {
  const double count = static_cast<double>(rows * cols);
  if (count == 0) return {0, 0, 0};
  double sum = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = data + i * stride;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += static_cast<double>(row[j]);
  }
  const double mean = sum / count;
  double m2 = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = data + i * stride;
#pragma omp simd reduction(+ : m2)
    for (int64_t j = 0; j < cols; ++j) {
      const double d = static_cast<double>(row[j]) - mean;
      m2 += d * d;
    }
  }
  return {count, mean, m2};
}

// Per-channel moments of a dense [batch, channels, size] tensor.
template <typename T>
std::vector<Moments> channel_moments(const T* data, int64_t batch, int64_t channels, int64_t size) {
  std::vector<Moments> partials(batch * channels);
  for_each_plane(batch * channels, [&](int64_t plane) {
    partials[plane] = block_moments(data + plane * size, 1, size, size);
  });
  return combine_planes(partials, batch, channels);
}

// The DFC gate's upsampling from [h, w] to [H, W], row by row (index maps from ghostfused/index_maps.h).
template <typename T>
struct Upsample {
  int64_t h, w, H, W;
  bool nearest;
  std::vector<int64_t> row_source, col_source;       // nearest
  std::vector<BilinearTap<T>> row_taps, col_taps;    // bilinear

  Upsample(int64_t h, int64_t w, int64_t H, int64_t W, bool nearest) : h(h), w(w), H(H), W(W), nearest(nearest) {
    if (nearest) {
      for (int64_t i = 0; i < H; ++i) row_source.push_back(nearest_source_index(i, h, H));
      for (int64_t j = 0; j < W; ++j) col_source.push_back(nearest_source_index(j, w, W));
    } else {
      for (int64_t i = 0; i < H; ++i) row_taps.push_back(bilinear_tap<T>(i, h, H));
      for (int64_t j = 0; j < W; ++j) col_taps.push_back(bilinear_tap<T>(j, w, W));
    }
  }

  // out[W]: full-resolution row i of the upsampled [h, w] plane; scratch[w].
  void expand_row(const T* plane, int64_t i, T* out, T* scratch) const {
    if (nearest) {
      const T* src = plane + row_source[i] * w;
      for (int64_t j = 0; j < W; ++j) out[j] = src[col_source[j]];
      return;
    }
    const BilinearTap<T> r = row_taps[i];
    const T* top = plane + r.i0 * w;
    const T* bottom = plane + r.i1 * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) scratch[j] = r.w0 * top[j] + r.w1 * bottom[j];
    for (int64_t j = 0; j < W; ++j) {
      const BilinearTap<T> c = col_taps[j];
      out[j] = c.w0 * scratch[c.i0] + c.w1 * scratch[c.i1];
    }
  }

  // plane[h, w] += the transposed upsampling of full-resolution row i (grad[W]); scratch[w].
  void reduce_row(const T* grad, int64_t i, T* plane, T* scratch) const {
    std::fill(scratch, scratch + w, T(0));
    if (nearest) {
      for (int64_t j = 0; j < W; ++j) scratch[col_source[j]] += grad[j];
      T* dst = plane + row_source[i] * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) dst[j] += scratch[j];
      return;
    }
    for (int64_t j = 0; j < W; ++j) {
      const BilinearTap<T> c = col_taps[j];
      scratch[c.i0] += c.w0 * grad[j];
      scratch[c.i1] += c.w1 * grad[j];
    }
    const BilinearTap<T> r = row_taps[i];
    T* top = plane + r.i0 * w;
    T* bottom = plane + r.i1 * w;
    for (int64_t j = 0; j < w; ++j) top[j] += r.w0 * scratch[j];
    for (int64_t j = 0; j < w; ++j) bottom[j] += r.w1 * scratch[j];
  }
};

// A quarter-resolution gate [batch, channels, h, w] and its upsampling to full resolution.
template <typename T>
struct Gate {
  const T* data;
  int64_t channels;
  Upsample<T> upsample;

  const T* plane(int64_t n, int64_t c) const { return data + (n * channels + c) * upsample.h * upsample.w; }
};

// [batch, out, size] = weight[out, in] @ x[batch, in, size]: a 1x1 convolution as one (batched) GEMM.
at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight);

// [out, in] = sum over n of grad[n] @ input[n]^T (grad [batch, out, size], input [batch, in, size]): the weight
// gradient of a 1x1 convolution. Split into fixed chunks of the reduction whose partial GEMMs are summed in
// order, so the result does not depend on the thread count.
at::Tensor conv1x1_weight_grad(const at::Tensor& grad, const at::Tensor& input);

}  // namespace ghostfused::cpu
