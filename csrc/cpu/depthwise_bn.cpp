// depthwise_bn on the CPU: a depthwise convolution (odd k x k kernel, zero padding k / 2, any stride) and the
// BatchNorm after it, as GhostNetV2's strided depthwise layer (conv_dw, bn_dw) and its shortcut's first two layers
// compute them. PyTorch's NCHW depthwise convolution is slow on CPUs, its backward most of all (see
// ghostfused/ops/depthwise_bn.py for the measurements), and these layers run at the widest resolutions.
//
// Dense NCHW, one [H, W] plane per task. Each padded plane is stored split into its stride phases in both axes
// (PhasedPlane), so that every tap of a whole output plane is one contiguous, vectorised loop for any stride, with no
// bounds to clip (the padding is stored as zeros), and the taps of a vector of outputs are summed in registers. A plane's statistics and gradient sums
// are computed by one thread and combined over the batch in order, so results do not depend on the thread count.
//
// eval:  one pass, the BatchNorm folded into the taps.
// train: the convolution with per-plane moments, then the group's (or batch's) statistics, then one normalising
//        pass over the (quarter-size at stride 2) output.
// backward: the convolution is recomputed from x (k * k FMAs an element) instead of being saved by the forward:
//        one pass for it and the BatchNorm's gradient sums, one for the input and weight gradients.
#include <torch/library.h>

#include "common.h"

namespace ghostfused::cpu {
namespace {

constexpr const char* kForward = "ghostfused_C::depthwise_bn_forward";
constexpr const char* kBackward = "ghostfused_C::depthwise_bn_backward";

// Flat loops run over whole vectors: their lengths are rounded up to this many elements (the extra outputs are
// margins too), and every array they touch has that much slack.
constexpr int64_t kVector = 16;

int64_t round_up(int64_t n) { return (n + kVector - 1) / kVector * kVector; }

// Planes narrower than this load and store through a map of positions (PhasedPlane): their rows are too short for the
// vectorised row splitting.
constexpr int64_t kNarrowWidth = 16;

// One plane with its zero padding, split into stride phases in both axes: phase (p, r) holds the padded positions
// (u, v) = (i * s + p, j * s + r) at [i, j] of a [rows, cols] array (ghostfused/depthwise.h: stride_phase_span).
// Tap (a, b) of output (oi, oj) then reads phase (a % s, b % s) at [oi + a / s, oj + b / s]: with outputs indexed
// flat as oi * cols + oj, every tap of the whole plane is one contiguous loop at a fixed offset, long even for 7x7
// outputs. The cols - out_w columns past each output row are computed and discarded (the flat layout's margin).
template <typename T>
struct PhasedPlane {
  int64_t height, width, stride, pad, rows, cols, phase_size;
  std::vector<T> data;
  std::vector<std::pair<int64_t, int64_t>> columns;  // [stride]: phase_columns
  // Narrow planes: the phased position of every plane element, so that load and store are one flat loop (row by
  // row, the per-row work was most of a 14x14 plane's load: the 7x7 outputs of GhostNetV2's last strided layers).
  std::vector<int32_t> positions;

  explicit PhasedPlane(const DepthwiseSizes& s)
      : height(s.height), width(s.width), stride(s.stride), pad(depthwise_padding(s.k)),
        rows(stride_phase_span(s.height, s.k, s.stride)), cols(stride_phase_span(s.width, s.k, s.stride)),
        // slack past the last row: a flat loop's last margin reads up to (k - 1) / s + kVector further
        phase_size(rows * cols + (s.k - 1) / s.stride + kVector), data(stride * stride * phase_size, T(0)) {
    for (int64_t r = 0; r < stride; ++r) columns.push_back(phase_columns(r));
    if (width < kNarrowWidth)
      for (int64_t i = 0; i < height; ++i)
        for (int64_t j = 0; j < width; ++j) {
          const int64_t u = i + pad, v = j + pad;
          positions.push_back(static_cast<int32_t>((u % stride * stride + v % stride) * phase_size +
                                                   u / stride * cols + v / stride));
        }
  }

  // Flat output positions a loop over outputs covers (out_h rows of cols, rounded up).
  int64_t flat_outputs(int64_t out_h) const { return round_up(out_h * cols); }

  T* phase(int64_t p, int64_t r) { return data.data() + (p * stride + r) * phase_size; }
  const T* phase(int64_t p, int64_t r) const { return data.data() + (p * stride + r) * phase_size; }

  // What tap (a, b) reads for flat output index 0.
  const T* tap_source(int a, int b) const { return phase(a % stride, b % stride) + a / stride * cols + b / stride; }
  T* tap_source(int a, int b) { return phase(a % stride, b % stride) + a / stride * cols + b / stride; }

  // Fill from an [height, width] plane. Padding positions are never written, so they stay zero.
  void load(const T* plane) {
    if (!positions.empty()) {
      for (size_t q = 0; q < positions.size(); ++q) data[positions[q]] = plane[q];
      return;
    }
    for (int64_t i = 0; i < height; ++i) {
      const T* padded = plane + i * width - pad;  // padded position u at padded[u], read only inside the row
      const auto [q0, q1] = both_phases();
      if (stride == 2) deinterleave(padded + 2 * q0, q1 - q0, row(i, 0) + q0, row(i, 1) + q0);
      for (int64_t r = 0; r < stride; ++r) {
        T* dst = row(i, r);
        for_columns_outside(r, q0, q1, [&](int64_t q) { dst[q] = padded[q * stride + r]; });
      }
    }
  }

  // The inverse of load: plane[i * width + j] from the phases (padding positions dropped).
  void store(T* plane) {
    if (!positions.empty()) {
      for (size_t q = 0; q < positions.size(); ++q) plane[q] = data[positions[q]];
      return;
    }
    for (int64_t i = 0; i < height; ++i) {
      T* padded = plane + i * width - pad;
      const auto [q0, q1] = both_phases();
      if (stride == 2) interleave(row(i, 0) + q0, row(i, 1) + q0, q1 - q0, padded + 2 * q0);
      for (int64_t r = 0; r < stride; ++r) {
        const T* src = row(i, r);
        for_columns_outside(r, q0, q1, [&](int64_t q) { padded[q * stride + r] = src[q]; });
      }
    }
  }

 private:
  // Plane row i's positions of column phase r.
  T* row(int64_t i, int64_t r) {
    const int64_t u = i + pad;
    return phase(u % stride, r) + u / stride * cols;
  }

  // Stride 2: the indices q at which both column phases hold a column of the plane (empty otherwise).
  std::pair<int64_t, int64_t> both_phases() const {
    if (stride != 2) return {0, 0};
    const int64_t q0 = std::max(columns[0].first, columns[1].first);
    return {q0, std::max(q0, std::min(columns[0].second, columns[1].second))};
  }

  // f(q) for the indices q of column phase r that hold a column of the plane, except those in [q0, q1).
  template <typename F>
  void for_columns_outside(int64_t r, int64_t q0, int64_t q1, const F& f) const {
    const auto [first, last] = columns[r];
    for (int64_t q = first; q < std::min(last, q0); ++q) f(q);
    for (int64_t q = std::max(first, q1); q < last; ++q) f(q);  // q1 >= q0
  }

  // The indices q of column phase r whose padded position q * stride + r holds a column of the plane.
  std::pair<int64_t, int64_t> phase_columns(int64_t r) const {
    const int64_t q0 = r >= pad ? 0 : (pad - r + stride - 1) / stride;
    const int64_t q1 = (width + pad - r + stride - 1) / stride;
    return {q0, std::max(q0, q1)};
  }
};

// out[q] = (first ? init : out[q]) + sum over taps t of w[t] * src[t][q], q in [0, size): each vector of outputs
// sums its taps in registers (N, the tap count, is a compile-time constant so that the loop over taps unrolls).
template <typename T, int N>
void sum_taps(T* out, const T* const* src, const T* w, int64_t size, bool first, T init) {
  const T* s[N];
  T v[N];
  for (int t = 0; t < N; ++t) s[t] = src[t], v[t] = w[t];
  if (first) {
#pragma omp simd
    for (int64_t q = 0; q < size; ++q) {
      T sum = init;
#pragma GCC unroll 25
      for (int t = 0; t < N; ++t) sum += v[t] * s[t][q];
      out[q] = sum;
    }
  } else {
#pragma omp simd
    for (int64_t q = 0; q < size; ++q) {
      T sum = out[q];
#pragma GCC unroll 25
      for (int t = 0; t < N; ++t) sum += v[t] * s[t][q];
      out[q] = sum;
    }
  }
}

// sum_taps over any number of taps, in groups with compiled tap counts (all 25 of a 5x5 kernel, else up to 9), in
// order; with no taps, out = init (first) or unchanged.
template <typename T>
void sum_taps(T* out, const T* const* src, const T* w, int count, int64_t size, bool first, T init) {
  if (count == 0 && first) std::fill(out, out + size, init);
  for (int t0 = 0; t0 < count;) {
    const int group = count - t0 >= 25 ? 25 : std::min(count - t0, 9);
    const bool head = first && t0 == 0;
    switch (group) {
      case 1: sum_taps<T, 1>(out, src + t0, w + t0, size, head, init); break;
      case 2: sum_taps<T, 2>(out, src + t0, w + t0, size, head, init); break;
      case 3: sum_taps<T, 3>(out, src + t0, w + t0, size, head, init); break;
      case 4: sum_taps<T, 4>(out, src + t0, w + t0, size, head, init); break;
      case 5: sum_taps<T, 5>(out, src + t0, w + t0, size, head, init); break;
      case 6: sum_taps<T, 6>(out, src + t0, w + t0, size, head, init); break;
      case 7: sum_taps<T, 7>(out, src + t0, w + t0, size, head, init); break;
      case 8: sum_taps<T, 8>(out, src + t0, w + t0, size, head, init); break;
      case 9: sum_taps<T, 9>(out, src + t0, w + t0, size, head, init); break;
      default: sum_taps<T, 25>(out, src + t0, w + t0, size, head, init); break;
    }
    t0 += group;
  }
}

// Per-thread buffers: the phased input plane, its gradient, two flat output planes, the margin mask, and where each
// tap reads in the convolution and in its transpose (the same buffers for every plane).
template <typename T>
struct PlaneScratch {
  // The taps of one phase of the transposed convolution: tap indices a * k + b and where each reads in dz.
  struct TransposedPhase {
    T* out;
    std::vector<int> taps;
    std::vector<const T*> sources;
  };

  PhasedPlane<T> in, grad_in;
  std::vector<T> z, dz;
  std::vector<uint8_t> in_margin;  // flat index -> whether it is a margin column
  int64_t dz_front;                // zeros before the flat output gradient (convolve_transposed reads back)
  int64_t flat;                    // flat output positions of a plane
  std::vector<const T*> sources;   // [k * k]: what tap t reads for flat output 0
  std::vector<TransposedPhase> transposed;
  std::vector<T> weights;          // a phase's taps, gathered

  explicit PlaneScratch(const DepthwiseSizes& s)
      : in(s), grad_in(s), z(in.flat_outputs(s.out_h)), in_margin(in.flat_outputs(s.out_h)),
        dz_front((s.k - 1) / s.stride * (in.cols + 1)), flat(in.flat_outputs(s.out_h)) {
    // convolve_transposed reads round_up(rows * cols) positions from up to dz_front before the output gradient
    dz.assign(dz_front + std::max(flat, round_up(in.rows * in.cols)), T(0));
    for (size_t q = 0; q < in_margin.size(); ++q)
      in_margin[q] = static_cast<int64_t>(q) % in.cols >= s.out_w || static_cast<int64_t>(q) >= s.out_h * in.cols;
    for (int t = 0; t < s.k * s.k; ++t) sources.push_back(in.tap_source(t / s.k, t % s.k));
    // Transposed: position [i, j] of phase (p, r) receives tap (a, b) with a % s == p, b % s == r from output
    // [i - a / s, j - b / s], a fixed offset back in the flat output gradient.
    for (int64_t p = 0; p < s.stride; ++p)
      for (int64_t r = 0; r < s.stride; ++r) {
        TransposedPhase phase{grad_in.phase(p, r), {}, {}};
        for (int64_t a = p; a < s.k; a += s.stride)
          for (int64_t b = r; b < s.k; b += s.stride) {
            phase.taps.push_back(static_cast<int>(a * s.k + b));
            phase.sources.push_back(grad_out() - (a / s.stride * in.cols + b / s.stride));
          }
        transposed.push_back(std::move(phase));
      }
  }

  // The flat output gradient, margins included (zero there).
  T* grad_out() { return dz.data() + dz_front; }
  const T* grad_out() const { return dz.data() + dz_front; }

  // out[flat] = bias + the depthwise convolution of `in` with taps [k * k], accumulated in row-major tap order.
  void convolve(const T* taps, T bias, T* out) const {
    sum_taps(out, sources.data(), taps, static_cast<int>(sources.size()), flat, true, bias);
  }

  // The transpose of convolve (without the bias): grad_in = the taps applied to grad_out(), gathered.
  void convolve_transposed(const T* taps) {
    for (TransposedPhase& phase : transposed) {
      weights.resize(phase.taps.size());
      for (size_t t = 0; t < phase.taps.size(); ++t) weights[t] = taps[phase.taps[t]];
      sum_taps(phase.out, phase.sources.data(), weights.data(), static_cast<int>(weights.size()),
               round_up(grad_in.rows * grad_in.cols), true, T(0));
    }
  }

  // taps_grad[k * k] += the weight gradient of convolve for the flat output gradient grad_out(): one pass over the
  // plane per group of up to kDotGroup taps, each summed per vector lane in T, then in double (a fixed order).
  // Margins are skipped by a select, so that a non-finite input read only by a margin does not reach the sums.
  void add_weight_grad(double* taps_grad) const {
    for (size_t t0 = 0; t0 < sources.size(); t0 += kDotGroup) {
      const int group = static_cast<int>(std::min<size_t>(kDotGroup, sources.size() - t0));
      T sums[kDotGroup] = {};
      switch (group) {
        case 1: dot_taps<1>(sources.data() + t0, sums); break;
        case 2: dot_taps<2>(sources.data() + t0, sums); break;
        case 3: dot_taps<3>(sources.data() + t0, sums); break;
        case 4: dot_taps<4>(sources.data() + t0, sums); break;
        case 5: dot_taps<5>(sources.data() + t0, sums); break;
        case 6: dot_taps<6>(sources.data() + t0, sums); break;
        case 7: dot_taps<7>(sources.data() + t0, sums); break;
        case 8: dot_taps<8>(sources.data() + t0, sums); break;
        default: dot_taps<9>(sources.data() + t0, sums); break;
      }
      for (int t = 0; t < group; ++t) taps_grad[t0 + t] += static_cast<double>(sums[t]);
    }
  }

 private:
  static constexpr int kDotGroup = 9;  // accumulators that stay in registers beside their operands (a 3x3 kernel)

  // sums[t] = sum over flat outputs q (margins skipped) of grad_out()[q] * src[t][q], per vector lane in T: the lanes'
  // partial sums are explicit, so that the compiler keeps each tap's in one register.
  template <int N>
  void dot_taps(const T* const* src, T* sums) const {
    constexpr int64_t lanes = 8;
    static_assert(kVector % lanes == 0, "flat is a multiple of kVector");
    const uint8_t* margin = in_margin.data();
    const T* g = grad_out();
    const T* s[N];
    for (int t = 0; t < N; ++t) s[t] = src[t];
    T acc[N][lanes] = {};
    for (int64_t q0 = 0; q0 < flat; q0 += lanes) {
#pragma GCC unroll 9
      for (int t = 0; t < N; ++t) {
        const T* st = s[t] + q0;
#pragma omp simd
        for (int64_t l = 0; l < lanes; ++l) acc[t][l] += margin[q0 + l] ? T(0) : g[q0 + l] * st[l];
      }
    }
    for (int t = 0; t < N; ++t) {
      T sum = T(0);
      for (int64_t l = 0; l < lanes; ++l) sum += acc[t][l];
      sums[t] = sum;
    }
  }
};

// dst[out_h * out_w] = f(the flat plane's valid elements), row by row.
template <typename T, typename F>
void compact(const T* flat, int64_t cols, const DepthwiseSizes& s, T* dst, const F& f) {
  for (int64_t oi = 0; oi < s.out_h; ++oi) {
    const T* src = flat + oi * cols;
    T* d = dst + oi * s.out_w;
#pragma omp simd
    for (int64_t oj = 0; oj < s.out_w; ++oj) d[oj] = f(src[oj]);
  }
}

// f(plane, c, scratch) over the batch's planes, in parallel, with scratch.in holding the plane of x.
template <typename T, typename F>
void for_each_plane(const T* x, const DepthwiseSizes& s, const F& f) {
  at::parallel_for(0, s.batch * s.channels, 1, [&](int64_t begin, int64_t end) {
    PlaneScratch<T> scratch(s);
    for (int64_t plane = begin; plane < end; ++plane) {
      scratch.in.load(x + plane * s.height * s.width);
      f(plane, plane % s.channels, scratch);
    }
  });
}

template <typename T>
void forward(const at::Tensor& x, const T* taps, BatchNorm& bn, const DepthwiseSizes& s, bool training, T* out) {
  const int64_t taps_per_channel = s.k * s.k, out_size = s.out_h * s.out_w;
  const T* xd = x.const_data_ptr<T>();
  const auto identity = [](T v) { return v; };
  if (!training) {  // the BatchNorm folded into the taps and a bias
    const Folded<T> affine = folded<T>(bn);
    std::vector<T> scaled(s.channels * taps_per_channel);
    for (int64_t t = 0; t < s.channels * taps_per_channel; ++t)
      scaled[t] = taps[t] * affine[t / taps_per_channel].scale;
    for_each_plane<T>(xd, s, [&](int64_t plane, int64_t c, PlaneScratch<T>& scratch) {
      scratch.convolve(scaled.data() + c * taps_per_channel, affine[c].shift, scratch.z.data());
      compact(scratch.z.data(), scratch.in.cols, s, out + plane * out_size, identity);
    });
    return;
  }
  std::vector<Moments> partials(s.batch * s.channels);
  for_each_plane<T>(xd, s, [&](int64_t plane, int64_t c, PlaneScratch<T>& scratch) {
    T* o = out + plane * out_size;
    scratch.convolve(taps + c * taps_per_channel, T(0), scratch.z.data());
    compact(scratch.z.data(), scratch.in.cols, s, o, identity);
    partials[plane] = moments_of(o, out_size);
  });
  set_batch_statistics(bn, combine_planes(partials, s.batch, s.channels));
  const Folded<T> affine = folded<T>(bn);
  at::parallel_for(0, s.batch * s.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const Affine<T> a = affine[plane % s.channels];
      T* o = out + plane * out_size;
#pragma omp simd
      for (int64_t q = 0; q < out_size; ++q) o[q] = a.scale * o[q] + a.shift;
    }
  });
}

struct DepthwiseGrads {
  at::Tensor x, weight;
  std::vector<double> bn_weight, bn_bias;
};

template <typename T>
DepthwiseGrads backward(const at::Tensor& x, const at::Tensor& weight, const T* grad, const BatchNorm& bn,
                        const DepthwiseSizes& s, bool training) {
  const int64_t taps_per_channel = s.k * s.k, out_size = s.out_h * s.out_w, planes = s.batch * s.channels;
  const T* xd = x.const_data_ptr<T>();
  const T* taps = weight.const_data_ptr<T>();
  // The BatchNorm's sums over its input z (the convolution, recomputed): sum dy and sum dy (z - mean), per output
  // row in T, accumulated in double in a fixed order.
  // z is kept (the output's size: a quarter of x's at stride 2) for the second pass.
  std::vector<GradSums> partials(planes);
  std::vector<T> z_all(planes * out_size);
  for_each_plane<T>(xd, s, [&](int64_t plane, int64_t c, PlaneScratch<T>& scratch) {
    T* z = z_all.data() + plane * out_size;
    scratch.convolve(taps + c * taps_per_channel, T(0), scratch.z.data());
    compact(scratch.z.data(), scratch.in.cols, s, z, [](T v) { return v; });
    const T* g = grad + plane * out_size;
    const T mean = static_cast<T>(bn.mean[c]);
    partials[plane] = {blocked_sum<T>(0, out_size, [&](int64_t q) { return g[q]; }),
                       blocked_sum<T>(0, out_size, [&](int64_t q) { return g[q] * (z[q] - mean); })};
  });
  const std::vector<GradSums> sums = combine_planes(partials, s.batch, s.channels);
  DepthwiseGrads grads;
  batch_norm_param_grads(bn, sums, grads.bn_weight, grads.bn_bias);
  const std::vector<BatchNormGrad<T>> coef =
      backward_coefficients<T>(bn, sums, static_cast<double>(s.batch * out_size), training);
  // dz = a dy + b z + c (flat, zero margins), then the input gradient (the transposed convolution) and the taps'
  // partial gradients.
  grads.x = empty_output({s.batch, s.channels, s.height, s.width}, x.options());
  T* dx = grads.x.mutable_data_ptr<T>();
  std::vector<double> taps_partials(planes * taps_per_channel, 0.0);
  for_each_plane<T>(xd, s, [&](int64_t plane, int64_t c, PlaneScratch<T>& scratch) {
    const T* w = taps + c * taps_per_channel;
    const int64_t cols = scratch.in.cols;
    const T* z = z_all.data() + plane * out_size;
    T* dz = scratch.grad_out();
    const T* g = grad + plane * out_size;
    const BatchNormGrad<T> k = coef[c];
    for (int64_t oi = 0; oi < s.out_h; ++oi) {
      const T* gr = g + oi * s.out_w;
      const T* zr = z + oi * s.out_w;
      T* d = dz + oi * cols;
      if (training) {
#pragma omp simd
        for (int64_t oj = 0; oj < s.out_w; ++oj) d[oj] = k.a * gr[oj] + k.b * zr[oj] + k.c;
      } else {
#pragma omp simd
        for (int64_t oj = 0; oj < s.out_w; ++oj) d[oj] = k.a * gr[oj];
      }
      std::fill(d + s.out_w, d + cols, T(0));
    }
    scratch.add_weight_grad(taps_partials.data() + plane * taps_per_channel);
    scratch.convolve_transposed(w);
    scratch.grad_in.store(dx + plane * s.height * s.width);
  });
  grads.weight = combine_tap_partials(taps_partials, s.batch, s.channels, taps_per_channel, x.options())
                     .view(weight.sizes());
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_bn_forward(
    const at::Tensor& x, const at::Tensor& weight, at::TensorList bn_weight, at::TensorList bn_bias,
    at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t stride, bool training,
    std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const DepthwiseSizes s = check_depthwise_bn_arguments(kForward, x, weight, bn_weight, bn_bias, bn_mean, bn_var,
                                                        bn_eps, stride, training && !sync.active());
  std::vector<BatchNorm> bns = batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync);
  const at::ScalarType dtype = compute_dtype(x);
  const at::Tensor xd = dense(x, dtype), wd = dense(weight, dtype);
  at::Tensor out = empty_output({s.batch, s.channels, s.out_h, s.out_w}, xd.options());
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES(dtype, "depthwise_bn_forward", [&] {
    forward<scalar_t>(xd, wd.const_data_ptr<scalar_t>(), bns[0], s, training, out.mutable_data_ptr<scalar_t>());
    std::tie(mean, var) = packed_statistics({&bns[0]}, x);
  });
  return {as_output(out, x), mean, var, at::empty({0}, mean.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_bn_backward(
    const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& x, const at::Tensor& weight,
    at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var,
    at::ArrayRef<double> bn_eps, int64_t stride, bool training, std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const DepthwiseSizes s = check_depthwise_bn_arguments(kBackward, x, weight, bn_weight, bn_bias, bn_mean, bn_var,
                                                        bn_eps, stride, training && !sync.active());
  check_grad_out(kBackward, grad_out, x, {s.batch, s.channels, s.out_h, s.out_w});
  TORCH_CHECK(saved.numel() == 0, kBackward, ": saved must be empty (the forward saves nothing), got ",
              saved.numel(), " elements");
  std::vector<BatchNorm> bns = batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync);
  const at::ScalarType dtype = compute_dtype(x);
  const at::Tensor xd = dense(x, dtype), wd = dense(weight, dtype), grad = dense(grad_out, dtype);
  DepthwiseGrads grads;
  AT_DISPATCH_FLOATING_TYPES(dtype, "depthwise_bn_backward", [&] {
    grads = backward<scalar_t>(xd, wd, grad.const_data_ptr<scalar_t>(), bns[0], s, training);
  });
  return {as_output(grads.x, x), grads.weight.to(x.scalar_type()), packed({&grads.bn_weight}, x),
          packed({&grads.bn_bias}, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CPU, m) {
  m.impl("depthwise_bn_forward", &depthwise_bn_forward);
  m.impl("depthwise_bn_backward", &depthwise_bn_backward);
}

}  // namespace ghostfused::cpu
