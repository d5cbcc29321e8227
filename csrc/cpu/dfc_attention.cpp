// dfc_attention on the CPU: the gate at quarter resolution (pooling, one GEMM over the batch, per-block passes
// for the depthwise convolutions, BatchNorms and sigmoid), and features times the upsampled gate: for NCHW data
// by the task that wrote each block of the gate, right after it; for NHWC in one pass over the pixels.
#include "dfc_attention.h"

#include <torch/library.h>

#include <numeric>
#include <optional>

namespace ghostfused::cpu {
namespace {

// A depthwise weight [C, 1, 1, K] or [C, 1, K, 1] as [K, C]: tap b of every channel contiguous. Transposed by a
// plain loop per tap (K is a handful): ATen's transposed copy of these small matrices, and then the tiled
// transpose, whose tiles are mostly edges at K = 3, showed in batch-1 profiles.
template <typename T>
at::Tensor taps_by_position(const at::Tensor& weight, int64_t channels, int64_t k) {
  const at::Tensor src_tensor = dense(weight, c10::CppTypeToScalarType<T>::value);
  at::Tensor out = at::empty({k, channels}, src_tensor.options());
  const T* src = src_tensor.template data_ptr<T>();
  T* dst = out.template data_ptr<T>();
  for (int64_t b = 0; b < k; ++b)
    for (int64_t c = 0; c < channels; ++c) dst[b * channels + c] = src[c * k + b];
  return out;
}

// Channels per task of the quarter-resolution passes (tasks are (sample, channel block) pairs).
constexpr int64_t kChannelBlock = 128;

// [N, Cin, h * w] = the 2x2 average pool of x [N, Cin, H, W], dense NCHW, stored NHWC ([N, h * w, Cin], returned as
// its transposed view): the layout of conv1x1_nhwc's GEMM rows. A task pools one output row of every channel into a
// [Cin, w] tile and transposes the tile while it is in L1 (pooled NCHW planes transposed after the pool were a
// single-threaded pass).
template <typename T>
at::Tensor average_pool(const at::Tensor& x, int64_t batch, int64_t channels, int64_t height, int64_t width) {
  const int64_t h = pooled_size(height), w = pooled_size(width);
  at::Tensor pooled = cached_empty({batch, h * w, channels}, x.options());
  const T* src = x.template data_ptr<T>();
  T* dst = pooled.template data_ptr<T>();
  at::parallel_for(0, batch * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(channels * w);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / h, i = row % h;
      for (int64_t c = 0; c < channels; ++c) {
        const T* top = src + ((n * channels + c) * height + 2 * i) * width;
        const T* bottom = top + width;
        T* out = tile.data() + c * w;
#pragma omp simd
        for (int64_t j = 0; j < w; ++j)
          out[j] = average_2x2(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
      }
      transpose(tile.data(), channels, w, w, dst + row * w * channels, channels);
    }
  });
  return pooled.transpose(1, 2);
}

// The same pool of x dense channels_last, computed NHWC (one pass per output row, vectorised over channels).
template <typename T>
at::Tensor average_pool_nhwc(const at::Tensor& x, int64_t batch, int64_t channels, int64_t height, int64_t width) {
  const int64_t h = pooled_size(height), w = pooled_size(width);
  at::Tensor pooled = cached_empty({batch, h * w, channels}, x.options());
  const T* src = x.template data_ptr<T>();
  T* dst = pooled.template data_ptr<T>();
  at::parallel_for(0, batch * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / h, i = row % h;
      for (int64_t j = 0; j < w; ++j) {
        const T* top = src + ((n * height + 2 * i) * width + 2 * j) * channels;
        const T* bottom = top + width * channels;
        T* out = dst + (row * w + j) * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c)
          out[c] = average_2x2(top[c], top[channels + c], bottom[c], bottom[channels + c]);
      }
    }
  });
  return pooled.transpose(1, 2);
}

// [N, L, C] = x^T @ weight^T for x [N, Cin, L] with NHWC strides (the pooled input, the gate's gradient) and weight
// [C, Cin]: the 1x1 convolution with an NHWC output, the GEMM orientation that stays efficient for a few pixels and
// many channels. One GEMM over the whole batch's pixels: a batched GEMM packed the weight again for every sample, 30%
// of a batch-8 call at 7x7 with 960 channels.
at::Tensor conv1x1_nhwc(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t batch = x.size(0), in = x.size(1), pixels = x.size(2), channels = weight.size(0);
  at::Tensor out = cached_empty({batch, pixels, channels}, x.options());
  if (batch * pixels > 0) {
    at::Tensor rows = out.view({batch * pixels, channels});
    at::mm_out(rows, x.transpose(1, 2).view({batch * pixels, in}), weight.t());
  }
  return out;
}

// One task of the quarter-resolution passes: sample n, channels [c0, c0 + cb) of [N, L, C] arrays; local buffers
// are [L, ld], each pixel's cb channels padded to ld (local_stride). The channels split into blocks of equal size
// (at most kChannelBlock, at least 8 channels); when the batch alone leaves threads idle, the blocks per sample are a
// multiple of the threads it leaves idle, so that the tasks split evenly (at batch 1 on two threads 72 channels run
// as two blocks of 36: three blocks of 24 left one thread waiting a third of the pass). Channels are independent, so
// the split does not change results.
struct Block {
  int64_t n, c0, cb, ld;
};

// The row length of a local buffer: cb rounded up to 8 values, whole 64-byte vectors (Lanes) of double and whole
// 32-byte ones of float, so that the depthwise passes run on whole vectors (rounding float rows up to 16 values
// padded the 72-channel blocks of the 56x56 stage by 11%). The padding lanes hold values that are never stored.
int64_t local_stride(int64_t cb) {
  constexpr int64_t align = 8;
  return (cb + align - 1) / align * align;
}

int64_t block_size(int64_t batch, int64_t channels) {
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t step = threads / std::gcd(std::max<int64_t>(batch, 1), threads);
  const int64_t needed = (channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t blocks = std::min((needed + step - 1) / step * step, std::max<int64_t>(channels / 8, 1));
  return std::max<int64_t>((channels + blocks - 1) / blocks, 1);
}

Block block_of(int64_t task, int64_t size, int64_t channels) {
  const int64_t blocks = (channels + size - 1) / size;
  const int64_t c0 = (task % blocks) * size;
  const int64_t cb = std::min(size, channels - c0);
  return {task / blocks, c0, cb, local_stride(cb)};
}

// The quarter-resolution geometry shared by the passes.
struct Quarter {
  int64_t h, w, size, channels;
  int k;
};

// local[l, i] = BN(global[l, c0 + i]) for the block's channels, BN folded.
template <typename T>
void load_affine(const T* global, const Quarter& q, const Block& b, const Folded<T>& bn, T* local) {
  const T* src = global + b.n * q.size * q.channels + b.c0;
  const T *scale = bn.scale.data() + b.c0, *shift = bn.shift.data() + b.c0;
  for (int64_t l = 0; l < q.size; ++l) {
    const T* row = src + l * q.channels;
    T* dst = local + l * b.ld;
#pragma omp simd
    for (int64_t i = 0; i < b.cb; ++i) dst[i] = scale[i] * row[i] + shift[i];
  }
}

template <typename T>
void load(const T* global, const Quarter& q, const Block& b, T* local) {
  const T* src = global + b.n * q.size * q.channels + b.c0;
  for (int64_t l = 0; l < q.size; ++l) std::copy(src + l * q.channels, src + l * q.channels + b.cb, local + l * b.ld);
}

template <typename T>
void store(const T* local, const Quarter& q, const Block& b, T* global) {
  T* dst = global + b.n * q.size * q.channels + b.c0;
  for (int64_t l = 0; l < q.size; ++l) std::copy(local + l * b.ld, local + l * b.ld + b.cb, dst + l * q.channels);
}

// What a depthwise pass applies to each sum before storing it: nothing, the block's folded BatchNorm, or the
// BatchNorm and the sigmoid.
enum class Finish { kNone, kAffine, kAffineSigmoid };

// Channels [c, c + lanes of V) of output row i of depthwise_local: the K taps and the BatchNorm of those channels
// in registers, each output summed in a register (taps in order, out-of-range ones skipped: the zero padding) and
// stored once.
template <typename V, int K, Finish finish, typename T>
void depthwise_row_lanes(const T* in, const T* taps, const T* scale, const T* shift, const Quarter& q, int64_t ld,
                         bool horizontal, int64_t i, int64_t c, T* out) {
  const int k = K > 0 ? K : q.k, pad = k / 2;
  const int64_t length = horizontal ? q.w : q.h;  // the axis the taps run along
  const int64_t step = horizontal ? ld : q.w * ld;  // values between neighbouring taps' inputs
  V w[K > 0 ? K : 1];
  if constexpr (K > 0)
    for (int t = 0; t < K; ++t) w[t] = load_lanes<V>(taps + t * ld + c);
  const auto tap = [&](int t) {
    if constexpr (K > 0) return w[t];
    else return load_lanes<V>(taps + t * ld + c);
  };
  V s{}, b{};
  if constexpr (finish != Finish::kNone) {
    s = load_lanes<V>(scale + c);
    b = load_lanes<V>(shift + c);
  }
  for (int64_t j = 0; j < q.w; ++j) {
    const TapRange range = tap_range(horizontal ? j : i, length, k);
    const int64_t at = (i * q.w + j) * ld + c;
    V acc{};
    for (int t = 0; t < k; ++t)
      if (t >= range.lo && t < range.hi) acc += tap(t) * load_lanes<V>(in + at + (t - pad) * step);
    if constexpr (finish != Finish::kNone) acc = s * acc + b;
    store_lanes(out + at, acc);
  }
}

// Depthwise convolution of a local [h, w, ld] block along columns (horizontal, (1, K)) or rows (vertical, (K, 1)),
// each sum then finished with the folded BatchNorm (scale, shift: [ld]); taps: [K, ld]. Row by row, and within a row
// one 64-byte vector of channels at a time over its pixels (then a 32-byte one where ld leaves half a vector), and
// the sigmoid over the finished row while it is in L1. K = 5 (GhostNetV2's DFC) is a template parameter so that the
// tap loop unrolls; 0 takes q.k.
template <typename T, int K, Finish finish>
void depthwise_local(const T* in, const T* taps, const T* scale, const T* shift, const Quarter& q, int64_t ld,
                     bool horizontal, T* out) {
  const int64_t row = q.w * ld;
  for (int64_t i = 0; i < q.h; ++i) {
    int64_t c = 0;
    for (; c + kLanes<T> <= ld; c += kLanes<T>)
      depthwise_row_lanes<Lanes<T>, K, finish>(in, taps, scale, shift, q, ld, horizontal, i, c, out);
    if (c < ld) depthwise_row_lanes<Lanes<T, 32>, K, finish>(in, taps, scale, shift, q, ld, horizontal, i, c, out);
    if constexpr (finish == Finish::kAffineSigmoid) {
      T* dst = out + i * row;
#pragma omp simd
      for (int64_t e = 0; e < row; ++e) dst[e] = sigmoid_simd(dst[e]);
    }
  }
}

// depthwise_local with K unrolled where it is 5.
template <typename T, Finish finish>
void depthwise_nhwc(const T* in, const T* taps, const T* scale, const T* shift, const Quarter& q, int64_t ld,
                    bool horizontal, T* out) {
  if (q.k == 5)
    depthwise_local<T, 5, finish>(in, taps, scale, shift, q, ld, horizontal, out);
  else
    depthwise_local<T, 0, finish>(in, taps, scale, shift, q, ld, horizontal, out);
}

// local[l, c] = sigmoid(scale[c] * local[l, c] + shift[c]) for a local [L, ld] block, pixel by pixel.
template <typename T>
void sigmoid_affine(T* local, const T* scale, const T* shift, const Quarter& q, int64_t ld) {
  for (int64_t l = 0; l < q.size; ++l) {
    T* z = local + l * ld;
#pragma omp simd
    for (int64_t c = 0; c < ld; ++c) z[c] = sigmoid_simd(scale[c] * z[c] + shift[c]);
  }
}

// Backward of depthwise_nhwc for local [L, ld] blocks: in_grad (zeroed by the caller) += the transposed convolution
// of grad, and taps_grad[t * cb + c] += sum of grad * the tap's input, in double; taps: [K, C] offset to the block.
template <typename T>
void depthwise_nhwc_backward(const T* in, const T* taps, const Quarter& q, const Block& b, bool horizontal,
                             const T* grad, T* in_grad, double* taps_grad) {
  const int64_t pad = q.k / 2, cb = b.cb, ld = b.ld;
  for (int t = 0; t < q.k; ++t) {
    const T* w = taps + t * q.channels;
    double* tg = taps_grad + t * cb;
    const TapRange range = tap_outputs(t, horizontal ? q.w : q.h, q.k);
    for (int64_t i = 0; i < q.h; ++i)
      for (int64_t j = 0; j < q.w; ++j) {
        const int64_t along = horizontal ? j : i;
        if (along < range.lo || along >= range.hi) continue;
        const int64_t source = horizontal ? i * q.w + j + t - pad : (i + t - pad) * q.w + j;
        const T* g = grad + (i * q.w + j) * ld;
        const T* src = in + source * ld;
        T* dst = in_grad + source * ld;
#pragma omp simd
        for (int64_t c = 0; c < cb; ++c) {
          tg[c] += static_cast<double>(g[c]) * static_cast<double>(src[c]);
          dst[c] += w[c] * g[c];
        }
      }
  }
}

// Per-channel moments of a local [L, ld] block into partials[n * C + c0 + i].
template <typename T>
void block_moments(const T* local, const Quarter& q, const Block& b, std::vector<Moments>& partials) {
  std::vector<double> mean(b.cb, 0.0), m2(b.cb, 0.0);
  for (int64_t l = 0; l < q.size; ++l)
#pragma omp simd
    for (int64_t c = 0; c < b.cb; ++c) mean[c] += static_cast<double>(local[l * b.ld + c]);
  for (int64_t c = 0; c < b.cb; ++c) mean[c] /= static_cast<double>(q.size);
  for (int64_t l = 0; l < q.size; ++l)
#pragma omp simd
    for (int64_t c = 0; c < b.cb; ++c) {
      const double d = static_cast<double>(local[l * b.ld + c]) - mean[c];
      m2[c] += d * d;
    }
  for (int64_t c = 0; c < b.cb; ++c)
    partials[b.n * q.channels + b.c0 + c] = {static_cast<double>(q.size), mean[c], m2[c]};
}

// Per-channel sum(grad) and sum(grad * (z - mean)) of local [L, ld] blocks into partials[n * C + c0 + i].
template <typename T>
void block_grad_sums(const T* grad, const T* z, const Quarter& q, const Block& b, const BatchNorm& bn,
                     std::vector<GradSums>& partials) {
  std::vector<double> dy(b.cb, 0.0), dy_centered(b.cb, 0.0);
  const double* mean = bn.mean.data() + b.c0;
  for (int64_t l = 0; l < q.size; ++l)
#pragma omp simd
    for (int64_t c = 0; c < b.cb; ++c) {
      const double g = static_cast<double>(grad[l * b.ld + c]);
      dy[c] += g;
      dy_centered[c] += g * (static_cast<double>(z[l * b.ld + c]) - mean[c]);
    }
  for (int64_t c = 0; c < b.cb; ++c) partials[b.n * q.channels + b.c0 + c] = {dy[c], dy_centered[c]};
}

// Per-thread buffers: three local [L, ld] arrays, the forward's taps [K, ld] and BatchNorm [ld] of one block, and
// the backward's per-channel coefficients (sized by the block, not kChannelBlock: zeroing unused buffers showed in
// batch-1 profiles). Zero-initialised, so that padding lanes start finite.
template <typename T>
struct Scratch {
  std::vector<T> u, z, grad;
  std::vector<T> taps, scale, shift;
  std::vector<T> a, b, c;
  std::vector<double> taps_grad;

  Scratch(const Quarter& q, int64_t block, bool backward)
      : u(q.size * local_stride(block)), z(u.size()), grad(backward ? u.size() : 0),
        taps(backward ? 0 : q.k * local_stride(block)), scale(backward ? 0 : local_stride(block)),
        shift(scale.size()), a(block), b(block), c(block), taps_grad(backward ? q.k * block : 0) {}

  // The block's taps from [K, C] into taps [K, ld].
  const T* block_taps(const T* all, const Quarter& q, const Block& blk) {
    for (int t = 0; t < q.k; ++t) std::copy(all + t * q.channels + blk.c0, all + t * q.channels + blk.c0 + blk.cb,
                                            taps.data() + t * blk.ld);
    return taps.data();
  }

  // The block's channels of a folded BatchNorm into scale and shift.
  void block_affine(const Folded<T>& bn, const Block& blk) {
    std::copy(bn.scale.data() + blk.c0, bn.scale.data() + blk.c0 + blk.cb, scale.data());
    std::copy(bn.shift.data() + blk.c0, bn.shift.data() + blk.c0 + blk.cb, shift.data());
  }

  // The backward coefficients of the block's channels as vectors.
  void set_coefficients(const std::vector<BatchNormGrad<T>>& k, const Block& blk) {
    for (int64_t i = 0; i < blk.cb; ++i) {
      a[i] = k[blk.c0 + i].a;
      b[i] = k[blk.c0 + i].b;
      c[i] = k[blk.c0 + i].c;
    }
  }
};

// Run body(block, scratch) for every (sample, channel block) task, split over the threads. The block size is
// fixed before the parallel region: inside it at::get_num_threads() reads 1.
template <typename T, typename Body>
void for_each_block(const Quarter& q, int64_t batch, bool backward, const Body& body) {
  const int64_t size = block_size(batch, q.channels);
  const int64_t tasks = batch * ((q.channels + size - 1) / size);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(q, size, backward);
    for (int64_t task = begin; task < end; ++task) body(block_of(task, size, q.channels), sc);
  });
}

// out = features * the upsampled gate for planes [c0, c0 + count) of sample n ([N, C, H * W] NCHW).
template <typename T>
void gate_product(const Gate<T>& gate, const T* features, int64_t n, int64_t c0, int64_t count, T* out) {
  const int64_t size = gate.H * gate.W;
  std::vector<T> scratch(size);
  for (int64_t c = c0; c < c0 + count; ++c) {
    const int64_t offset = (n * gate.channels + c) * size;
    gate.multiply(n, c, features + offset, out + offset, scratch.data());
  }
}

// The same for features and out dense NHWC ([N, H * W, C]): one pass over pixels, vectorised over channels.
template <typename T>
void gate_product_nhwc(const Gate<T>& gate, const T* features, int64_t batch, T* out) {
  const at::Tensor nhwc = gate.nhwc(batch);
  const T* gq = nhwc.template data_ptr<T>();
  const int64_t channels = gate.channels;
  at::parallel_for(0, batch * gate.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> values(channels);
    for (int64_t row = begin; row < end; ++row)
      for (int64_t j = 0; j < gate.W; ++j) {
        const T* g = gate.pixel(gq, row / gate.H, row % gate.H, j, 0, channels, values.data());
        const T* src = features + (row * gate.W + j) * channels;
        T* dst = out + (row * gate.W + j) * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) dst[c] = src[c] * g[c];
      }
  });
}

// dfeatures = dout * the upsampled gate; dgate [N, C, h * w] = features * dout reduced to the gate's resolution.
template <typename T>
void gate_product_backward(const Gate<T>& gate, const T* grad_out, const T* features, int64_t batch, T* dfeatures,
                           T* dgate) {
  const int64_t size = gate.H * gate.W, gate_size = gate.h * gate.w;
  at::parallel_for(0, batch * gate.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> values(size), product(size);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / gate.channels, c = plane % gate.channels;
      gate.values(n, c, 0, gate.H, values.data());
      const T* go = grad_out + plane * size;
      const T* f = features + plane * size;
      T* dst = dfeatures + plane * size;
#pragma omp simd
      for (int64_t q = 0; q < size; ++q) {
        dst[q] = go[q] * values[q];
        product[q] = go[q] * f[q];
      }
      T* dg = dgate + plane * gate_size;
      std::fill(dg, dg + gate_size, T(0));
      gate.reduce(product.data(), 0, gate.H, dg);
    }
  });
}

// The same for grad_out, features and dfeatures dense NHWC: one pass over the pixels of a (sample, channel block)
// task, vectorised over channels, the gate's gradient reduced at quarter resolution NHWC (a task owns its channels,
// so no two tasks add to one value), then transposed into dgate.
template <typename T>
void gate_product_backward_nhwc(const Gate<T>& gate, const T* grad_out, const T* features, int64_t batch,
                                T* dfeatures, T* dgate) {
  const at::Tensor gate_nhwc = gate.nhwc(batch);
  const T* gq = gate_nhwc.template data_ptr<T>();
  const int64_t channels = gate.channels, gate_size = gate.h * gate.w;
  at::Tensor dgate_nhwc = at::zeros({batch, gate_size, channels}, gate_nhwc.options());
  T* dg = dgate_nhwc.template data_ptr<T>();
  const int64_t size = block_size(batch, channels);
  const int64_t tasks = batch * ((channels + size - 1) / size);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> values(size), product(size);
    for (int64_t task = begin; task < end; ++task) {
      const Block b = block_of(task, size, channels);
      for (int64_t i = 0; i < gate.H; ++i)
        for (int64_t j = 0; j < gate.W; ++j) {
          const int64_t offset = ((b.n * gate.H + i) * gate.W + j) * channels + b.c0;
          const T* g = gate.pixel(gq, b.n, i, j, b.c0, b.cb, values.data());
          const T* go = grad_out + offset;
          const T* f = features + offset;
          T* dst = dfeatures + offset;
#pragma omp simd
          for (int64_t c = 0; c < b.cb; ++c) {
            dst[c] = go[c] * g[c];
            product[c] = go[c] * f[c];
          }
          gate.reduce_pixel(product.data(), b.n, i, j, b.c0, b.cb, dg);
        }
    }
  });
  for (int64_t n = 0; n < batch; ++n)
    transpose(dg + n * gate_size * channels, gate_size, channels, channels, dgate + n * channels * gate_size,
              gate_size);
}

}  // namespace

template <typename T>
DfcGate<T> dfc_gate(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                    const at::Tensor& vertical_weight, std::vector<BatchNorm> bns, const DfcSizes& sizes,
                    bool batch_statistics, bool keep_intermediates, const GateBlockDone<T>& block_done) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<T>::value;
  DfcGate<T> g;
  g.sizes = sizes;
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  const int64_t channels = sizes.channels, k = sizes.kernel;
  const Quarter q{sizes.pooled_h, sizes.pooled_w, sizes.pooled_h * sizes.pooled_w, channels, static_cast<int>(k)};
  g.conv_weight = dense(conv_weight, dtype).view({channels, g.in_channels});
  g.horizontal_taps = taps_by_position<T>(horizontal_weight, channels, k);
  g.vertical_taps = taps_by_position<T>(vertical_weight, channels, k);
  g.bns = std::move(bns);
  g.nhwc = x.scalar_type() == dtype && takes_nhwc_path(x);
  g.pooled = g.nhwc ? average_pool_nhwc<T>(x, g.batch, g.in_channels, g.height, g.width)
                    : average_pool<T>(dense(x, dtype), g.batch, g.in_channels, g.height, g.width);
  g.z0 = conv1x1_nhwc(g.pooled, g.conv_weight);
  g.gate = cached_empty({g.batch, channels, q.size}, g.z0.options());
  const T* z0 = g.z0.template data_ptr<T>();
  const T* htaps = g.horizontal_taps.template data_ptr<T>();
  const T* vtaps = g.vertical_taps.template data_ptr<T>();
  T* gate = g.gate.template data_ptr<T>();
  std::optional<Gate<T>> view;
  if (block_done) view.emplace(g.view());
  std::vector<Moments> partials(g.batch * channels);
  auto fold = [&](int index) {
    if (batch_statistics) set_batch_statistics(g.bns[index], combine_planes(partials, g.batch, channels));
    g.affine[index] = folded<T>(g.bns[index]);
  };
  // The block's gate [L, ld] stored NCHW, then handed to block_done.
  auto store_gate = [&](const T* local, const Block& b) {
    transpose(local, q.size, b.cb, b.ld, gate + (b.n * channels + b.c0) * q.size, q.size);
    if (block_done) block_done(*view, b.n, b.c0, b.cb);
  };

  if (batch_statistics)
    for_each_block<T>(q, g.batch, false, [&](const Block& b, Scratch<T>& sc) {
      load(z0, q, b, sc.z.data());
      block_moments(sc.z.data(), q, b, partials);
    });
  fold(0);
  if (!batch_statistics && !keep_intermediates) {  // inference: every stage of a block in one go
    fold(1);
    fold(2);
    for_each_block<T>(q, g.batch, false, [&](const Block& b, Scratch<T>& sc) {
      load_affine(z0, q, b, g.affine[0], sc.u.data());
      sc.block_affine(g.affine[1], b);
      depthwise_nhwc<T, Finish::kAffine>(sc.u.data(), sc.block_taps(htaps, q, b), sc.scale.data(), sc.shift.data(),
                                         q, b.ld, true, sc.z.data());
      sc.block_affine(g.affine[2], b);
      depthwise_nhwc<T, Finish::kAffineSigmoid>(sc.z.data(), sc.block_taps(vtaps, q, b), sc.scale.data(),
                                                sc.shift.data(), q, b.ld, false, sc.u.data());
      store_gate(sc.u.data(), b);
    });
    return g;
  }

  // Stage by stage, each BatchNorm's statistics complete before the next stage uses them.
  g.z1 = cached_empty(g.z0.sizes(), g.z0.options());
  g.z2 = cached_empty(g.z0.sizes(), g.z0.options());
  T* z1 = g.z1.template data_ptr<T>();
  T* z2 = g.z2.template data_ptr<T>();
  for_each_block<T>(q, g.batch, false, [&](const Block& b, Scratch<T>& sc) {
    load_affine(z0, q, b, g.affine[0], sc.u.data());
    depthwise_nhwc<T, Finish::kNone>(sc.u.data(), sc.block_taps(htaps, q, b), nullptr, nullptr, q, b.ld, true,
                                     sc.z.data());
    store(sc.z.data(), q, b, z1);
    if (batch_statistics) block_moments(sc.z.data(), q, b, partials);
  });
  fold(1);
  for_each_block<T>(q, g.batch, false, [&](const Block& b, Scratch<T>& sc) {
    load_affine(z1, q, b, g.affine[1], sc.u.data());
    depthwise_nhwc<T, Finish::kNone>(sc.u.data(), sc.block_taps(vtaps, q, b), nullptr, nullptr, q, b.ld, false,
                                     sc.z.data());
    store(sc.z.data(), q, b, z2);
    if (batch_statistics) block_moments(sc.z.data(), q, b, partials);
  });
  fold(2);
  for_each_block<T>(q, g.batch, false, [&](const Block& b, Scratch<T>& sc) {
    load(z2, q, b, sc.z.data());
    sc.block_affine(g.affine[2], b);
    sigmoid_affine(sc.z.data(), sc.scale.data(), sc.shift.data(), q, b.ld);
    store_gate(sc.z.data(), b);
  });
  return g;
}

template <typename T>
DfcGrads dfc_gate_backward(const DfcGate<T>& g, const T* dgate, bool training) {
  const int64_t channels = g.sizes.channels, k = g.sizes.kernel;
  const Quarter q{g.sizes.pooled_h, g.sizes.pooled_w, g.sizes.pooled_h * g.sizes.pooled_w, channels,
                  static_cast<int>(k)};
  const double count = static_cast<double>(g.batch * q.size);
  const T* z0 = g.z0.template data_ptr<T>();
  const T* z1 = g.z1.template data_ptr<T>();
  const T* z2 = g.z2.template data_ptr<T>();
  const T* gate = g.gate.template data_ptr<T>();
  const T* htaps = g.horizontal_taps.template data_ptr<T>();
  const T* vtaps = g.vertical_taps.template data_ptr<T>();
  std::vector<GradSums> partials(g.batch * channels);
  std::vector<GradSums> sums[3];
  auto reduce = [&](int index) {
    sums[index] = combine_planes(partials, g.batch, channels);
    return backward_coefficients<T>(g.bns[index], sums[index], count, training);
  };
  // du2 = the gradient through the sigmoid, for a block (gate and dgate are NCHW; scratch: [L, ld]).
  auto sigmoid_grad = [&](const Block& b, T* du2, T* scratch) {
    transpose(dgate + (b.n * channels + b.c0) * q.size, b.cb, q.size, q.size, du2, b.ld);
    transpose(gate + (b.n * channels + b.c0) * q.size, b.cb, q.size, q.size, scratch, b.ld);
#pragma omp simd
    for (int64_t i = 0; i < q.size * b.ld; ++i) du2[i] = sigmoid_backward(du2[i], scratch[i]);
  };
  // grad = a * grad + b * z + c, per channel (the BatchNorm backward of a block).
  auto batch_norm_grad = [&](Scratch<T>& sc, const Block& b, T* grad, const T* z) {
    for (int64_t l = 0; l < q.size; ++l)
#pragma omp simd
      for (int64_t c = 0; c < b.cb; ++c)
        grad[l * b.ld + c] = sc.a[c] * grad[l * b.ld + c] + sc.b[c] * z[l * b.ld + c] + sc.c[c];
  };
  std::vector<double> tap_partials[2] = {std::vector<double>(g.batch * channels * k, 0.0),
                                         std::vector<double>(g.batch * channels * k, 0.0)};
  auto store_taps = [&](Scratch<T>& sc, const Block& b, std::vector<double>& out) {
    for (int64_t c = 0; c < b.cb; ++c)
      for (int64_t t = 0; t < k; ++t) out[(b.n * channels + b.c0 + c) * k + t] = sc.taps_grad[t * b.cb + c];
  };

  // The sigmoid and the vertical BatchNorm: sums for its coefficients.
  for_each_block<T>(q, g.batch, true, [&](const Block& b, Scratch<T>& sc) {
    sigmoid_grad(b, sc.grad.data(), sc.z.data());
    load(z2, q, b, sc.z.data());
    block_grad_sums(sc.grad.data(), sc.z.data(), q, b, g.bns[2], partials);
  });
  const std::vector<BatchNormGrad<T>> k2 = reduce(2);

  // The vertical convolution: weight gradient and u1's gradient (u1 = BN1(z1)), then the horizontal BN's sums.
  at::Tensor grad_a = cached_empty(g.z0.sizes(), g.z0.options());
  at::Tensor grad_b = cached_empty(g.z0.sizes(), g.z0.options());
  T* du1 = grad_a.template data_ptr<T>();
  for_each_block<T>(q, g.batch, true, [&](const Block& b, Scratch<T>& sc) {
    sc.set_coefficients(k2, b);
    sigmoid_grad(b, sc.grad.data(), sc.z.data());
    load(z2, q, b, sc.z.data());
    batch_norm_grad(sc, b, sc.grad.data(), sc.z.data());
    load_affine(z1, q, b, g.affine[1], sc.u.data());
    std::fill(sc.z.begin(), sc.z.end(), T(0));
    std::fill(sc.taps_grad.begin(), sc.taps_grad.end(), 0.0);
    depthwise_nhwc_backward(sc.u.data(), vtaps + b.c0, q, b, false, sc.grad.data(), sc.z.data(),
                            sc.taps_grad.data());
    store_taps(sc, b, tap_partials[1]);
    store(sc.z.data(), q, b, du1);
    load(z1, q, b, sc.u.data());
    block_grad_sums(sc.z.data(), sc.u.data(), q, b, g.bns[1], partials);
  });
  const std::vector<BatchNormGrad<T>> k1 = reduce(1);

  // The horizontal convolution: weight gradient and u0's gradient, then the conv BN's sums.
  T* du0 = grad_b.template data_ptr<T>();
  for_each_block<T>(q, g.batch, true, [&](const Block& b, Scratch<T>& sc) {
    sc.set_coefficients(k1, b);
    load(du1, q, b, sc.grad.data());
    load(z1, q, b, sc.z.data());
    batch_norm_grad(sc, b, sc.grad.data(), sc.z.data());
    load_affine(z0, q, b, g.affine[0], sc.u.data());
    std::fill(sc.z.begin(), sc.z.end(), T(0));
    std::fill(sc.taps_grad.begin(), sc.taps_grad.end(), 0.0);
    depthwise_nhwc_backward(sc.u.data(), htaps + b.c0, q, b, true, sc.grad.data(), sc.z.data(),
                            sc.taps_grad.data());
    store_taps(sc, b, tap_partials[0]);
    store(sc.z.data(), q, b, du0);
    load(z0, q, b, sc.u.data());
    block_grad_sums(sc.z.data(), sc.u.data(), q, b, g.bns[0], partials);
  });
  const std::vector<BatchNormGrad<T>> k0 = reduce(0);

  // dz0 in place, then the 1x1 convolution's gradients.
  for_each_block<T>(q, g.batch, true, [&](const Block& b, Scratch<T>& sc) {
    sc.set_coefficients(k0, b);
    load(du0, q, b, sc.grad.data());
    load(z0, q, b, sc.z.data());
    batch_norm_grad(sc, b, sc.grad.data(), sc.z.data());
    store(sc.grad.data(), q, b, du0);
  });

  DfcGrads grads;
  const at::Tensor dz0 = grad_b.transpose(1, 2);  // [N, C, L]
  grads.pooled = g.nhwc ? conv1x1_nhwc(dz0, g.conv_weight.t()).transpose(1, 2) : conv1x1(dz0, g.conv_weight.t());
  grads.conv_weight = conv1x1_weight_grad(dz0, g.pooled);
  grads.horizontal_weight = combine_tap_partials(tap_partials[0], g.batch, channels, k, g.z0.options());
  grads.vertical_weight = combine_tap_partials(tap_partials[1], g.batch, channels, k, g.z0.options());
  grads.bn_weight.resize(3);
  grads.bn_bias.resize(3);
  for (int i = 0; i < 3; ++i) batch_norm_param_grads(g.bns[i], sums[i], grads.bn_weight[i], grads.bn_bias[i]);
  return grads;
}

template <typename T>
void pool_backward(const at::Tensor& pooled_grad, int64_t height, int64_t width, T* dx, bool accumulate,
                   bool nhwc) {
  const int64_t h = pooled_size(height), w = pooled_size(width);
  const int64_t batch = pooled_grad.size(0), channels = pooled_grad.size(1);
  const int64_t planes = batch * channels;
  const T* src = pooled_grad.template data_ptr<T>();
  if (nhwc) {  // pooled_grad [N, h * w, Cin] and dx [N, H, W, Cin]: one pass per row, vectorised over channels
    at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / height, i = row % height;
        for (int64_t j = 0; j < width; ++j) {
          T* out = dx + (row * width + j) * channels;
          const bool pooled = i < 2 * h && j < 2 * w;  // else a row or column the pooling dropped
          const T* grad = src + ((n * h + i / 2) * w + j / 2) * channels;
          if (accumulate && pooled) {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) out[c] += grad[c] * T(0.25);
          } else if (pooled) {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) out[c] = grad[c] * T(0.25);
          } else if (!accumulate) {
            std::fill(out, out + channels, T(0));
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
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
    }
  });
}

#define GHOSTFUSED_INSTANTIATE(T)                                                                                \
  template DfcGate<T> dfc_gate<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,   \
                                  std::vector<BatchNorm>, const DfcSizes&, bool, bool,                           \
                                  const GateBlockDone<T>&);                                                      \
  template DfcGrads dfc_gate_backward<T>(const DfcGate<T>&, const T*, bool);                                     \
  template void pool_backward<T>(const at::Tensor&, int64_t, int64_t, T*, bool, bool);
GHOSTFUSED_INSTANTIATE(float)
GHOSTFUSED_INSTANTIATE(double)
#undef GHOSTFUSED_INSTANTIATE

namespace {

constexpr const char* kForward = "ghostfused_C::dfc_attention_forward";
constexpr const char* kBackward = "ghostfused_C::dfc_attention_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dfc_attention_forward(
    const at::Tensor& x, const at::Tensor& features, const at::Tensor& conv_weight,
    const at::Tensor& horizontal_weight, const at::Tensor& vertical_weight, at::TensorList bn_weight,
    at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
    c10::string_view upsample, bool training, std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const DfcSizes s = check_dfc_attention_arguments(kForward, x, features, conv_weight, horizontal_weight,
    vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, std::string(upsample), training && !sync.active());
  const at::ScalarType dtype = compute_dtype(x);
  const bool nhwc = takes_nhwc_path(x);  // x, features and out stay NHWC
  const at::Tensor xd = nhwc ? dense_channels_last(x, dtype) : dense(x, dtype);
  const at::Tensor feats = nhwc ? dense_channels_last(features, dtype) : dense(features, dtype);
  at::Tensor out = empty_output(feats.sizes(), feats.options(),
                                nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES(dtype, "dfc_attention_forward", [&] {
    const scalar_t* f = feats.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    GateBlockDone<scalar_t> product;  // NCHW: each block's planes multiplied by the task that wrote their gate
    if (!nhwc)
      product = [&](const Gate<scalar_t>& gate, int64_t n, int64_t c0, int64_t count) {
        gate_product(gate, f, n, c0, count, o);
      };
    const DfcGate<scalar_t> g =
        dfc_gate<scalar_t>(xd, conv_weight, horizontal_weight, vertical_weight,
                           batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync), s, training, false, product);
    if (nhwc) gate_product_nhwc(g.view(), f, g.batch, o);
    std::tie(mean, var) = packed_statistics({&g.bns[0], &g.bns[1], &g.bns[2]}, x);
  });
  return {as_output(out, x), mean, var, at::empty({0}, xd.options())};  // the backward recomputes the gate
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dfc_attention_backward(const at::Tensor& grad_out, const at::Tensor& /*saved*/, const at::Tensor& x,
                       const at::Tensor& features, const at::Tensor& conv_weight, const at::Tensor& horizontal_weight,
                       const at::Tensor& vertical_weight, at::TensorList bn_weight, at::TensorList bn_bias,
                       at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps,
                       c10::string_view upsample, bool training, std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const DfcSizes s = check_dfc_attention_arguments(kBackward, x, features, conv_weight, horizontal_weight,
    vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, std::string(upsample), training && !sync.active());
  check_grad_out(kBackward, grad_out, x, s.channels);
  const at::ScalarType dtype = compute_dtype(x);
  const bool nhwc = takes_nhwc_path(x);  // x, features, grad_out and the gradients stay NHWC
  const auto dense_as_x = [&](const at::Tensor& t) { return nhwc ? dense_channels_last(t, dtype) : dense(t, dtype); };
  const at::Tensor xd = dense_as_x(x), feats = dense_as_x(features), grad = dense_as_x(grad_out);
  at::Tensor dfeatures = empty_output(feats.sizes(), feats.options(), memory_format_of(x));
  at::Tensor dx = empty_output(x.sizes(), feats.options(), memory_format_of(x));
  DfcGrads grads;
  AT_DISPATCH_FLOATING_TYPES(dtype, "dfc_attention_backward", [&] {
    const DfcGate<scalar_t> g =
        dfc_gate<scalar_t>(xd, conv_weight, horizontal_weight, vertical_weight,
                           batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync), s, false, true);
    at::Tensor dgate = cached_empty(g.gate.sizes(), g.gate.options());
    if (nhwc) {
      gate_product_backward_nhwc(g.view(), grad.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(), g.batch,
                                 dfeatures.data_ptr<scalar_t>(), dgate.data_ptr<scalar_t>());
    } else {
      gate_product_backward(g.view(), grad.data_ptr<scalar_t>(), feats.data_ptr<scalar_t>(), g.batch,
                            dfeatures.data_ptr<scalar_t>(), dgate.data_ptr<scalar_t>());
    }
    grads = dfc_gate_backward(g, dgate.data_ptr<scalar_t>(), training);
    pool_backward<scalar_t>(grads.pooled, g.height, g.width, dx.data_ptr<scalar_t>(), false, g.nhwc);
  });
  const at::ScalarType out_dtype = x.scalar_type();
  return {dx.to(out_dtype),
          dfeatures.to(out_dtype),
          grads.conv_weight.view(conv_weight.sizes()).to(out_dtype),
          grads.horizontal_weight.view(horizontal_weight.sizes()).to(out_dtype),
          grads.vertical_weight.view(vertical_weight.sizes()).to(out_dtype),
          packed({&grads.bn_weight[0], &grads.bn_weight[1], &grads.bn_weight[2]}, x),
          packed({&grads.bn_bias[0], &grads.bn_bias[1], &grads.bn_bias[2]}, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CPU, m) {
  m.impl("dfc_attention_forward", &dfc_attention_forward);
  m.impl("dfc_attention_backward", &dfc_attention_backward);
}

}  // namespace ghostfused::cpu
