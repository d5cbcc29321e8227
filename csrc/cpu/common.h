// Building blocks of the CPU kernels (csrc/cpu/<op>.cpp): BatchNorm state on the host, per-plane statistics
// combined in a fixed order, depthwise convolutions as flat loops, the DFC gate's upsampling, and the 1x1
// convolutions as GEMMs.
//
// Layouts: full-resolution data is dense NCHW and handled one [H, W] plane at a time, as flat arrays, so that
// every loop is long and vectorisable even for 7x7 planes. A depthwise tap (a, b) is then one flat loop over the
// output rows it reaches, reading the input shifted by (a - pad) rows and (b - pad) columns; the outputs whose read
// a shift wraps into the neighbouring row select zero by a per-column mask (PaddedPlane). The quarter-resolution
// DFC gate is NHWC ([N, h * w, C]), vectorised over channels.
// channels_last inputs stay NHWC in every mode, without a layout copy of x, the output, grad_out or the input
// gradient: the 1x1 convolutions are GEMMs over all N * H * W pixels, whose channel-major result
// ([C, N * H * W], PlaneLayout::channel_major) the plane loops read as they read NCHW planes; full-resolution passes
// over NHWC data either run per pixel, vectorised over channels, or transpose a block of channels into per-thread
// planes as they read it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <bit>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "../glue.h"
#include "block_cache.h"
#include "ghostfused/batch_norm.h"
#include "ghostfused/depthwise.h"
#include "ghostfused/index_maps.h"

namespace ghostfused::cpu {

// float16 / bfloat16 inputs are computed in float32; float32 and float64 natively.
at::ScalarType compute_dtype(const at::Tensor& x);

// t in dtype, dense NCHW: t itself when it is, else a detached copy.
at::Tensor dense(const at::Tensor& t, at::ScalarType dtype);

// t in dtype, dense channels_last: t itself when it is, else a detached copy.
at::Tensor dense_channels_last(const at::Tensor& t, at::ScalarType dtype);

// Whether an op's kernels take the NHWC path: x is channels_last (ghostfused.reference.memory_format_of).
bool takes_nhwc_path(const at::Tensor& x);

// Where the [size] plane of sample n, channel c lies in a [batch, channels, size] quantity: dense NCHW, or
// channel-major [channels, batch * size] (a GEMM's output over all the pixels of an NHWC input).
struct PlaneLayout {
  int64_t sample_stride, channel_stride;

  static PlaneLayout nchw(int64_t channels, int64_t size) { return {channels * size, size}; }
  static PlaneLayout channel_major(int64_t batch, int64_t size) { return {size, batch * size}; }
  int64_t offset(int64_t n, int64_t c) const { return n * sample_stride + c * channel_stride; }
};

// A kernel's output computed in NCHW and the compute dtype, returned in x's dtype and layout.
at::Tensor as_output(const at::Tensor& out, const at::Tensor& x);

// One BatchNorm's parameters and statistics on the host, in double, and the group whose batch it normalises over
// in training.
struct BatchNorm {
  std::vector<double> weight, bias, mean, var;  // mean / var: the statistics it normalises with
  double eps;
  SyncGroup sync;
};

// The op's BatchNorms from its schema lists; mean / var are bn_mean / bn_var (running or saved statistics).
std::vector<BatchNorm> batch_norms(at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                   at::TensorList bn_var, at::ArrayRef<double> bn_eps, const SyncGroup& sync);

// Replace a BatchNorm's mean / var by the batch statistics of per-channel moments (those of the whole group's
// batch when the BatchNorm synchronises).
void set_batch_statistics(BatchNorm& bn, const std::vector<Moments>& moments);

// Per-BatchNorm vectors packed into one tensor in the stats dtype of x (statistics, BatchNorm gradients).
at::Tensor packed(std::initializer_list<const std::vector<double>*> values, const at::Tensor& x);

// The op's packed statistics (stats_mean, stats_var).
std::tuple<at::Tensor, at::Tensor> packed_statistics(std::initializer_list<const BatchNorm*> bns, const at::Tensor& x);

// A BatchNorm folded into one affine map per channel (fold_batch_norm), in T, as two arrays that the passes
// vectorised over channels read directly.
template <typename T>
struct Folded {
  std::vector<T> scale, shift;

  Affine<T> operator[](size_t c) const { return {scale[c], shift[c]}; }
};

template <typename T>
Folded<T> folded(const BatchNorm& bn) {
  const size_t channels = bn.weight.size();
  Folded<T> out{std::vector<T>(channels), std::vector<T>(channels)};
  const double *weight = bn.weight.data(), *bias = bn.bias.data(), *mean = bn.mean.data(), *var = bn.var.data();
  T *scale = out.scale.data(), *shift = out.shift.data();
#pragma omp simd
  for (size_t c = 0; c < channels; ++c) {
    const Affine<double> a = fold_batch_norm(weight[c], bias[c], mean[c], var[c], bn.eps);
    scale[c] = static_cast<T>(a.scale);
    shift[c] = static_cast<T>(a.shift);
  }
  return out;
}

// The sums and count a training BatchNorm's input gradient takes: this process's, or the whole group's when the
// BatchNorm synchronises (its weight and bias gradients keep this process's sums, as nn.SyncBatchNorm's).
std::pair<std::vector<GradSums>, double> group_grad_sums(const BatchNorm& bn, const std::vector<GradSums>& sums,
                                                         double count);

// Per-channel backward coefficients (dx = a dy + b x + c) from the reduced sums over count values per channel.
template <typename T>
std::vector<BatchNormGrad<T>> backward_coefficients(const BatchNorm& bn, const std::vector<GradSums>& local_sums,
                                                    double local_count, bool training) {
  const auto [sums, count] =
      training ? group_grad_sums(bn, local_sums, local_count) : std::make_pair(local_sums, local_count);
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
// the work was split between threads.
std::vector<Moments> combine_planes(const std::vector<Moments>& partials, int64_t batch, int64_t channels);
std::vector<GradSums> combine_planes(const std::vector<GradSums>& partials, int64_t batch, int64_t channels);
// partials[(n * channels + c) * taps + t] summed over n: a depthwise weight gradient [channels, taps].
at::Tensor combine_tap_partials(const std::vector<double>& partials, int64_t batch, int64_t channels, int64_t taps,
                                const at::TensorOptions& options);

// exp(v), vectorisable: for float a Cephes-style range reduction and degree-6 polynomial (about 1 ulp) on the
// input clamped to [-87.3, 88]; outside that range the result is +Inf above exp's overflow and 0 below -87.3, as
// std::exp gives (less its denormals), so that sigmoid saturates to exactly 0 and 1 like PyTorch's; NaN
// propagates. For double the library exp.
inline float exp_simd(float v) {
  float c = v > 88.0f ? 88.0f : v;
  c = c < -87.3f ? -87.3f : c;
  const float n = std::floor(c * 1.44269504088896341f + 0.5f);
  const float r = c - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float e = p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  constexpr float overflow = 88.72283935546875f;  // logf(FLT_MAX)
  return v > overflow ? std::numeric_limits<float>::infinity() : (v < -87.3f ? 0.0f : e);
}

inline double exp_simd(double v) { return std::exp(v); }

// sigmoid(v) = 1 / (1 + exp(-v)) with exp_simd.
template <typename T>
T sigmoid_simd(T v) {
  return T(1) / (T(1) + exp_simd(-v));
}

// Bytes of T as one vector (GCC/Clang vector extensions); 64 bytes: one AVX-512 register, two AVX2 ones. Arithmetic
// on it is element-wise; a * b + c contracts to FMA as the scalar loops' does.
template <typename T, int Bytes>
struct LanesOf {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename T, int Bytes = 64>
using Lanes = typename LanesOf<T, Bytes>::type;
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename V, typename T>
V load_lanes(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename T>
void store_lanes(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for a [rows, cols] block, element by element.
template <typename T>
void transpose_elements(const T* src, int64_t rows, int64_t cols, int64_t src_stride, T* dst, int64_t dst_stride) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
}

#if defined(__AVX2__)
// An 8 x 8 float block in registers: element-wise, the scalar loop's scattered stores showed in batch-1 profiles.
inline void transpose_8x8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst[j * dst_stride + i] = src[i * src_stride + j] for a [rows, cols] block, in tiles that stay in L1 (float with
// AVX2: 8 x 8 blocks in registers, the edges element by element).
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t src_stride, T* dst, int64_t dst_stride) {
  constexpr int64_t tile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += tile)
    for (int64_t j0 = 0; j0 < cols; j0 += tile) {
      const int64_t i1 = std::min(rows, i0 + tile), j1 = std::min(cols, j0 + tile);
      int64_t i8 = i0, j8 = j0;  // the tile's part done in 8 x 8 blocks: rows [i0, i8) by columns [j0, j8)
#if defined(__AVX2__)
      if constexpr (std::is_same_v<T, float>) {
        i8 = i0 + (i1 - i0) / 8 * 8;
        j8 = j0 + (j1 - j0) / 8 * 8;
        for (int64_t i = i0; i < i8; i += 8)
          for (int64_t j = j0; j < j8; j += 8)
            transpose_8x8(src + i * src_stride + j, src_stride, dst + j * dst_stride + i, dst_stride);
      }
#endif
      transpose_elements(src + i0 * src_stride + j8, i8 - i0, j1 - j8, src_stride, dst + j8 * dst_stride + i0,
                         dst_stride);
      transpose_elements(src + i8 * src_stride + j0, i1 - i8, j1 - j0, src_stride, dst + j0 * dst_stride + i8,
                         dst_stride);
    }
}

// Moments of count values, two passes in double.
template <typename T>
Moments moments_of(const T* data, int64_t count) {
  if (count == 0) return {0, 0, 0};
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t q = 0; q < count; ++q) sum += static_cast<double>(data[q]);
  const double mean = sum / static_cast<double>(count);
  double m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t q = 0; q < count; ++q) {
    const double d = static_cast<double>(data[q]) - mean;
    m2 += d * d;
  }
  return {static_cast<double>(count), mean, m2};
}

// Per-channel moments of [batch, channels, size] planes laid out as `layout` says.
template <typename T>
std::vector<Moments> channel_moments(const T* data, int64_t batch, int64_t channels, int64_t size,
                                     const PlaneLayout& layout) {
  std::vector<Moments> partials(batch * channels);
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane)
      partials[plane] = moments_of(data + layout.offset(plane / channels, plane % channels), size);
  });
  return combine_planes(partials, batch, channels);
}

// A [height, width] plane for depthwise convolutions with odd kernels of size k, stored flat with k / 2 zero rows
// (and k / 2 zeros) of slack before and after it, so that every tap of every output row reads inside the array:
// out-of-plane rows read zeros. A tap in column b reads the plane shifted by b - k / 2 columns, which wraps into the
// neighbouring row for the first or last columns of a row; keep(b) masks those outputs (1 where the read stays in
// its row, 0 where it wrapped), so that the flat loops select zero there instead of reading a copy of the plane
// with those columns zeroed. Values are written through values().
template <typename T>
struct PaddedPlane {
  int64_t height, width;
  int k, pad;
  int64_t slack;
  std::vector<T> data;  // slack, the plane, slack
  std::vector<T> mask;  // [k, height * width]: keep(b)

  PaddedPlane(int64_t height, int64_t width, int k)
      : height(height), width(width), k(k), pad(k / 2), slack(pad * width + pad),
        data(height * width + 2 * slack, T(0)), mask(k * height * width) {
    for (int b = 0; b < k; ++b)
      for (int64_t i = 0; i < height; ++i) {
        T* row = mask.data() + (b * height + i) * width;
        for (int64_t j = 0; j < width; ++j) row[j] = j + b - pad >= 0 && j + b - pad < width ? T(1) : T(0);
      }
  }

  // The plane's values, [height * width].
  T* values() { return data.data() + slack; }
  const T* values() const { return data.data() + slack; }

  // Tap column b's mask, indexed like the plane (all ones for the centre column).
  const T* keep(int b) const { return mask.data() + b * height * width; }
};

// store(q, value) for q in [row0 * W, row1 * W) (flat positions of the plane), value = the depthwise convolution
// (taps [k * k], zero padding k / 2) of `in` at q; needs in's rows up to row1 + k / 2. The zero slack rows of
// PaddedPlane make every row alike; a tap column's reads that wrapped into the next row are selected away (not
// multiplied: a non-finite value in another column must not reach the output). The 3x3 kernel of GhostNet takes all
// nine taps in one register-blocked pass, summed column by column; other sizes accumulate one flat loop per tap, in
// row-major order, in `scratch` (row1 - row0 rows). store is inlined into the vectorised loops.
template <typename T, typename Store>
void depthwise_rows(const PaddedPlane<T>& in, const T* taps, int64_t row0, int64_t row1, T* scratch,
                    const Store& store) {
  const int64_t width = in.width, k = in.k, pad = in.pad, q0 = row0 * width, q1 = row1 * width;
  const T* x = in.values();
  if (k == 3) {
    const T* up = x - width;
    const T* down = x + width;
    const T *keep_left = in.keep(0), *keep_right = in.keep(2);
    const T w0 = taps[0], w1 = taps[1], w2 = taps[2], w3 = taps[3], w4 = taps[4], w5 = taps[5], w6 = taps[6],
            w7 = taps[7], w8 = taps[8];
#pragma omp simd
    for (int64_t q = q0; q < q1; ++q) {
      const T left = w0 * up[q - 1] + w3 * x[q - 1] + w6 * down[q - 1];
      const T centre = w1 * up[q] + w4 * x[q] + w7 * down[q];
      const T right = w2 * up[q + 1] + w5 * x[q + 1] + w8 * down[q + 1];
      store(q, (keep_left[q] != T(0) ? left : T(0)) + centre + (keep_right[q] != T(0) ? right : T(0)));
    }
    return;
  }
  T* acc = scratch - q0;  // indexed by flat position
  std::fill(acc + q0, acc + q1, T(0));
  for (int t = 0; t < k * k; ++t) {
    const int b = t % k;
    const T w = taps[t];
    const T* src = x + (t / k - pad) * width + (b - pad);
    const T* keep = in.keep(b);
    if (b == pad) {
#pragma omp simd
      for (int64_t q = q0; q < q1; ++q) acc[q] += w * src[q];
    } else {
#pragma omp simd
      for (int64_t q = q0; q < q1; ++q) {
        const T term = w * src[q];  // read unconditionally: a conditional read would not vectorise
        acc[q] += keep[q] != T(0) ? term : T(0);
      }
    }
  }
#pragma omp simd
  for (int64_t q = q0; q < q1; ++q) store(q, acc[q]);
}

// Stride 2 splits a row into its even and odd positions and joins them back: even[q] = row[2 q], odd[q] =
// row[2 q + 1], q in [0, count). With AVX2, eight float pairs per step by shuffles (the compilers' own code for these
// strided loops was scalar: a third of depthwise_bn's backward time).
template <typename T>
void deinterleave(const T* row, int64_t count, T* even, T* odd) {
  int64_t q = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; q + 8 <= count; q += 8) {
      const __m256 a = _mm256_loadu_ps(row + 2 * q), b = _mm256_loadu_ps(row + 2 * q + 8);
      // per 128-bit lane [a0 a2 b0 b2 | a4 a6 b4 b6], then the 64-bit blocks in the order 0, 2, 1, 3
      const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      _mm256_storeu_ps(even + q, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8)));
      _mm256_storeu_ps(odd + q, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8)));
    }
  }
#endif
  for (; q < count; ++q) {
    even[q] = row[2 * q];
    odd[q] = row[2 * q + 1];
  }
}

template <typename T>
void interleave(const T* even, const T* odd, int64_t count, T* row) {
  int64_t q = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; q + 8 <= count; q += 8) {
      const __m256 e = _mm256_loadu_ps(even + q), o = _mm256_loadu_ps(odd + q);
      const __m256 low = _mm256_unpacklo_ps(e, o), high = _mm256_unpackhi_ps(e, o);  // [e0 o0 e1 o1 | e4 o4 e5 o5]
      _mm256_storeu_ps(row + 2 * q, _mm256_permute2f128_ps(low, high, 0x20));
      _mm256_storeu_ps(row + 2 * q + 8, _mm256_permute2f128_ps(low, high, 0x31));
    }
  }
#endif
  for (; q < count; ++q) {
    row[2 * q] = even[q];
    row[2 * q + 1] = odd[q];
  }
}

// sum over [begin, end) of term(q), accumulated in T within blocks of 256 and in double across blocks (a fixed
// order, so deterministic; float partial sums of 256 terms keep float32 accuracy well within 1e-5).
template <typename T, typename Term>
double blocked_sum(int64_t begin, int64_t end, const Term& term) {
  double total = 0;
  for (int64_t q0 = begin; q0 < end; q0 += 256) {
    const int64_t q1 = std::min(end, q0 + 256);
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t q = q0; q < q1; ++q) sum += term(q);
    total += static_cast<double>(sum);
  }
  return total;
}

// taps_grad[a * k + b] += sum over outputs q of grad[q] * (the input tap (a, b) reads at q): the weight gradient of
// depthwise_rows over the whole plane.
template <typename T>
void depthwise_weight_grad(const PaddedPlane<T>& in, const T* grad, double* taps_grad) {
  const int64_t width = in.width, k = in.k, pad = in.pad;
  for (int a = 0; a < k; ++a) {
    const TapRange rows = tap_outputs(a, in.height, k);
    for (int b = 0; b < k && rows.lo < rows.hi; ++b) {
      const T* src = in.values() + (a - pad) * width + (b - pad);
      const T* keep = in.keep(b);
      taps_grad[a * k + b] += blocked_sum<T>(rows.lo * width, rows.hi * width, [&](int64_t q) {
        const T term = grad[q] * src[q];  // read unconditionally: a conditional read would not vectorise
        return keep[q] != T(0) ? term : T(0);
      });
    }
  }
}

// The taps of the transposed convolution: the kernel rotated by 180 degrees. depthwise_rows of the output gradient
// (as PaddedPlane) with these taps is the input gradient of depthwise_rows.
template <typename T>
void rotated_taps(const T* taps, int k, T* out) {
  for (int t = 0; t < k * k; ++t) out[t] = taps[k * k - 1 - t];
}

// The DFC gate g [N, C, h * w] upsampled to [H, W] ('nearest' or 'bilinear', ghostfused/index_maps.h).
template <typename T>
struct Gate {
  const T* data;
  int64_t channels, h, w, H, W;
  bool nearest;
  bool doubled_columns;  // nearest with W == 2 * w: column j reads j / 2, copied in pairs instead of gathered
  std::vector<int64_t> row_source, col_source, col_begin;  // nearest: source row / column; columns per source column
  std::vector<int32_t> pixel_source;  // nearest without doubled columns: the gate index of every pixel, row-major
  std::vector<BilinearTap<T>> row_taps, col_taps;          // bilinear

  Gate(const T* data, int64_t channels, int64_t h, int64_t w, int64_t H, int64_t W, bool nearest);

  const T* plane(int64_t n, int64_t c) const { return data + (n * channels + c) * h * w; }
  // out[(i - row0) * W + j], i in [row0, row1): channel c of sample n at full resolution.
  void values(int64_t n, int64_t c, int64_t row0, int64_t row1, T* out) const;
  // out[H * W] = features[H * W] times channel c of sample n at full resolution; scratch: H * W values.
  void multiply(int64_t n, int64_t c, const T* features, T* out, T* scratch) const;
  // plane[h * w] += the transposed upsampling of grad[(i - row0) * W + j], i in [row0, row1).
  void reduce(const T* grad, int64_t row0, int64_t row1, T* plane) const;
  // The gate of `batch` samples transposed to NHWC [batch, h * w, channels], for pixel().
  at::Tensor nhwc(int64_t batch) const;
  // The upsampled gate of channels [c0, c0 + count) at full-resolution pixel (i, j) of sample n, from nhwc()'s
  // data: for 'nearest' the stored values themselves, for 'bilinear' computed into values[count] (as values()
  // computes them).
  const T* pixel(const T* nhwc_data, int64_t n, int64_t i, int64_t j, int64_t c0, int64_t count, T* values) const;
  // The transpose of pixel(): nhwc_grad [batch, h * w, channels] += the gradient grad[count] of channels
  // [c0, c0 + count) of the upsampled gate at pixel (i, j) of sample n.
  void reduce_pixel(const T* grad, int64_t n, int64_t i, int64_t j, int64_t c0, int64_t count, T* nhwc_grad) const;
};

// [out, P] = weight[out, in] @ pixels[P, in]^T: a 1x1 convolution of P NHWC pixels as one GEMM over all of them,
// in the orientation that was 3x faster than pixels @ weight^T for ghostnetv2's first module (16 -> 8 channels at
// 112x112) and within 1.5x of it elsewhere (benchmarks/cpu_ops.py --gemm), split into chunks of pixels that depend
// on P only, each a single-threaded GEMM, so that the result does not depend on the thread count.
at::Tensor pixels_gemm(const at::Tensor& pixels, const at::Tensor& weight);

// [P, out] = rows[P, in] @ weight[in, out] (any strides), in chunks of rows as pixels_gemm: the input gradient of a
// 1x1 convolution written NHWC.
at::Tensor rows_gemm(const at::Tensor& rows, const at::Tensor& weight);

// [batch, out, size] = weight[out, in] @ x[batch, in, size]: a 1x1 convolution as one (batched) GEMM.
at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight);

// [out, in] = sum over n of grad[n] @ input[n]^T (grad [batch, out, size], input [batch, in, size], any strides):
// the weight gradient of a 1x1 convolution. Split into fixed chunks of the reduction whose partial GEMMs are
// summed in order, so the result does not depend on the thread count.
at::Tensor conv1x1_weight_grad(const at::Tensor& grad, const at::Tensor& input);

}  // namespace ghostfused::cpu
