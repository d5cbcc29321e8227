// stem on the CPU: GhostNetV2's stem in eval mode, act(BN(conv(x))) for a dense k x k convolution (odd k, zero
// padding k / 2, any stride) of few input channels (an image's three), one pass that writes each output once.
//
// Eager's stem (oneDNN) page-faults at every batch-8 call: its 6.4 MB output and a reorder buffer of the same size
// are fresh memory each time (ghostfused/ops/stem.py has the measurements). This kernel's output
// comes from the block cache (block_cache.h), with the BatchNorm folded into the taps and a bias and the ReLU
// applied as each output is stored.
//
// A task is a band of output rows of one sample. The band's padded input rows are split into their stride phases
// once (phase r holds positions j * stride + r at index j: ghostfused/depthwise.h, stride_phase_span), so that tap
// (c, a, b) of a whole output row is one contiguous run of phase b % stride of the band's row (row * stride + a) from
// index b / stride. Every output is the sum of all Cin * k * k taps in a fixed order, computed by one thread: the
// results do not depend on the thread count.
#include <torch/library.h>

#include "common.h"

namespace ghostfused::cpu {
namespace {

constexpr const char* kForward = "ghostfused_C::stem_forward";

// Output rows per task: a band's phased input rows stay in L1 / L2 while every output channel reads them.
constexpr int64_t kBandRows = 8;

// Output channels summed together: each input vector a tap reads is loaded once for the block.
constexpr int kChannelBlock = 4;

// out[i][j] = act(bias[i] + sum over taps t of w[i * taps + t] * src[t][j]) for O output channels i and j in
// [0, width): blocks of two vectors of j, whose O sums stay in registers while the taps are summed in order.
template <typename T, int O>
void output_rows(const T* const* src, int taps, const T* w, const T* bias, bool relu, int64_t width, T* const* out) {
  constexpr int64_t lanes = 64 / sizeof(T);
  int64_t j0 = 0;
  for (; j0 + lanes <= width; j0 += lanes) {
    T sum[O][lanes];
    for (int i = 0; i < O; ++i)
      for (int64_t l = 0; l < lanes; ++l) sum[i][l] = bias[i];
    for (int t = 0; t < taps; ++t) {
      const T* v = src[t] + j0;
      for (int i = 0; i < O; ++i) {
        const T wt = w[i * taps + t];
#pragma omp simd
        for (int64_t l = 0; l < lanes; ++l) sum[i][l] += wt * v[l];
      }
    }
    for (int i = 0; i < O; ++i)
#pragma omp simd
      for (int64_t l = 0; l < lanes; ++l) out[i][j0 + l] = activate(sum[i][l], relu);
  }
  for (int64_t j = j0; j < width; ++j)  // the tail, same order of the taps
    for (int i = 0; i < O; ++i) {
      T sum = bias[i];
      for (int t = 0; t < taps; ++t) sum += w[i * taps + t] * src[t][j];
      out[i][j] = activate(sum, relu);
    }
}

template <typename T>
void output_rows(int channels, const T* const* src, int taps, const T* w, const T* bias, bool relu, int64_t width,
                 T* const* out) {
  switch (channels) {
    case 1: output_rows<T, 1>(src, taps, w, bias, relu, width, out); break;
    case 2: output_rows<T, 2>(src, taps, w, bias, relu, width, out); break;
    case 3: output_rows<T, 3>(src, taps, w, bias, relu, width, out); break;
    default: output_rows<T, kChannelBlock>(src, taps, w, bias, relu, width, out); break;
  }
}

template <typename T>
void forward(const T* x, const T* weight, const Folded<T>& affine, const StemSizes& s, bool relu, T* out) {
  const int k = s.k, pad = depthwise_padding(k);
  const int taps = static_cast<int>(s.in_channels) * k * k;
  // The BatchNorm folded: taps scaled per output channel, its shift the bias.
  std::vector<T> scaled(s.out_channels * taps);
  for (int64_t t = 0; t < s.out_channels * taps; ++t) scaled[t] = weight[t] * affine.scale[t / taps];
  const int64_t span = stride_phase_span(s.width, k, s.stride);  // positions per phase of a padded row
  const int64_t bands = (s.out_h + kBandRows - 1) / kBandRows;
  const int64_t band_rows = (kBandRows - 1) * s.stride + k;  // padded input rows a band reads
  const int64_t out_size = s.out_h * s.out_w;
  at::parallel_for(0, s.batch * bands, 1, [&](int64_t begin, int64_t end) {
    // phases[((row * Cin + c) * stride + r) * span + j]: position j * stride + r of the band's padded row `row`
    std::vector<T> phases(band_rows * s.in_channels * s.stride * span), padded(s.stride * span, T(0));
    std::vector<const T*> src(taps);
    std::vector<T*> dst(kChannelBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, oi0 = (task % bands) * kBandRows;
      const int64_t oi1 = std::min(s.out_h, oi0 + kBandRows), u0 = oi0 * s.stride;
      const int64_t rows = (oi1 - oi0 - 1) * s.stride + k;
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t i = u0 + row - pad;  // the input row of padded row u0 + row
        for (int64_t c = 0; c < s.in_channels; ++c) {
          T* phase = phases.data() + (row * s.in_channels + c) * s.stride * span;
          if (i < 0 || i >= s.height) {
            std::fill(phase, phase + s.stride * span, T(0));
            continue;
          }
          const T* line = x + ((n * s.in_channels + c) * s.height + i) * s.width;
          std::copy(line, line + s.width, padded.data() + pad);  // the zero padding around it stays zero
          if (s.stride == 1) {
            std::copy(padded.begin(), padded.end(), phase);
          } else if (s.stride == 2) {
            deinterleave(padded.data(), span, phase, phase + span);
          } else {
            for (int64_t r = 0; r < s.stride; ++r)
              for (int64_t j = 0; j < span; ++j) phase[r * span + j] = padded[j * s.stride + r];
          }
        }
      }
      for (int64_t oi = oi0; oi < oi1; ++oi) {
        int t = 0;
        for (int64_t c = 0; c < s.in_channels; ++c)
          for (int a = 0; a < k; ++a)
            for (int b = 0; b < k; ++b, ++t) {
              const int64_t row = (oi - oi0) * s.stride + a;
              src[t] = phases.data() + ((row * s.in_channels + c) * s.stride + b % s.stride) * span + b / s.stride;
            }
        for (int64_t o0 = 0; o0 < s.out_channels; o0 += kChannelBlock) {
          const int channels = static_cast<int>(std::min<int64_t>(kChannelBlock, s.out_channels - o0));
          for (int i = 0; i < channels; ++i) dst[i] = out + (n * s.out_channels + o0 + i) * out_size + oi * s.out_w;
          output_rows(channels, src.data(), taps, scaled.data() + o0 * taps, affine.shift.data() + o0, relu,
                      s.out_w, dst.data());
        }
      }
    }
  });
}

at::Tensor stem_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                        at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t stride, bool relu) {
  const StemSizes s = check_stem_arguments(kForward, x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, bn_eps,
                                           stride);
  std::vector<BatchNorm> bns = batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, SyncGroup(std::nullopt));
  if (bias.has_value() && bias->defined()) {  // conv(x) + bias normalised: the bias joins the running mean
    at::Tensor b = bias->detach().to(at::kDouble).contiguous();
    const double* values = b.const_data_ptr<double>();
    for (size_t c = 0; c < bns[0].mean.size(); ++c) bns[0].mean[c] -= values[c];
  }
  const at::ScalarType dtype = compute_dtype(x);
  const at::Tensor xd = dense(x, dtype), wd = dense(weight, dtype);
  at::Tensor out = empty_output({s.batch, s.out_channels, s.out_h, s.out_w}, xd.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "stem_forward", [&] {
    forward<scalar_t>(xd.const_data_ptr<scalar_t>(), wd.const_data_ptr<scalar_t>(), folded<scalar_t>(bns[0]), s,
                      relu, out.mutable_data_ptr<scalar_t>());
  });
  return as_output(out, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CPU, m) {
  m.impl("stem_forward", &stem_forward);
}

}  // namespace ghostfused::cpu
