#include "common.h"

#include <ATen/ThreadLocalState.h>

#include <algorithm>

// MKL's thread-local thread count (its C interface; the lower-case names are the Fortran one, which takes a
// pointer), exported by torch's MKL builds; weak, so that the extension loads without it.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace ghostfused::cpu {

at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The common case (already dense, in dtype) returns t without a dispatcher call: a small kernel's fixed cost is
// mostly such calls, and the kernels run below autograd, so t's autograd metadata does not matter to them.
at::Tensor dense(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.detach().to(dtype).contiguous();
}

at::Tensor dense_channels_last(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.detach().to(dtype).contiguous(at::MemoryFormat::ChannelsLast);
}

bool takes_nhwc_path(const at::Tensor& x) {
  return memory_format_of(x) == at::MemoryFormat::ChannelsLast;
}

at::Tensor as_output(const at::Tensor& out, const at::Tensor& x) {
  const at::MemoryFormat format = memory_format_of(x);
  if (out.scalar_type() == x.scalar_type() && out.is_contiguous(format)) return out;
  return out.to(x.scalar_type()).contiguous(format);
}

namespace {

// data[i * stride], i < size, in double; the common stride 1 converted straight into the vector, with no zero fill
// first (every call of a fused layer reads its BatchNorms' vectors).
template <typename T>
std::vector<double> widened(const T* data, int64_t stride, int64_t size) {
  if (stride == 1) return std::vector<double>(data, data + size);
  std::vector<double> out(size);
  for (int64_t i = 0; i < size; ++i) out[i] = static_cast<double>(data[i * stride]);
  return out;
}

// A [C] tensor's values on the host (read in place when it is a CPU tensor: these are small and per call).
std::vector<double> host_vector(const at::Tensor& t) {
  const at::Tensor cpu = t.device().is_cpu() ? t : t.detach().cpu();
  std::vector<double> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cpu.scalar_type(), "host_vector", [&] {
    const int64_t stride = cpu.numel() > 0 ? cpu.stride(0) : 1;
    out = widened(cpu.const_data_ptr<scalar_t>(), stride, cpu.numel());
  });
  return out;
}

}  // namespace

std::vector<BatchNorm> batch_norms(at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
                                   at::TensorList bn_var, at::ArrayRef<double> bn_eps, const SyncGroup& sync) {
  std::vector<BatchNorm> out;
  for (size_t i = 0; i < bn_weight.size(); ++i)
    out.push_back({host_vector(bn_weight[i]), host_vector(bn_bias[i]), host_vector(bn_mean[i]),
                   host_vector(bn_var[i]), bn_eps[i], sync});
  return out;
}

void set_batch_statistics(BatchNorm& bn, const std::vector<Moments>& moments) {
  for (size_t c = 0; c < moments.size(); ++c) {
    bn.mean[c] = moments_mean(moments[c]);
    bn.var[c] = moments_biased_var(moments[c]);
  }
  if (!bn.sync.active()) return;
  // Every channel has the same count of values (N * H * W).
  const double count = moments.empty() ? 0.0 : moments[0].count;
  const auto options = at::TensorOptions().dtype(at::kDouble);
  at::Tensor mean = at::from_blob(bn.mean.data(), {static_cast<int64_t>(bn.mean.size())}, options);
  at::Tensor var = at::from_blob(bn.var.data(), {static_cast<int64_t>(bn.var.size())}, options);
  bn.sync.moments(mean, var, count);
}

std::pair<std::vector<GradSums>, double> group_grad_sums(const BatchNorm& bn, const std::vector<GradSums>& sums,
                                                         double count) {
  std::vector<GradSums> out = sums;
  if (!bn.sync.active()) return {out, count};
  static_assert(sizeof(GradSums) == 2 * sizeof(double), "GradSums is read as [C, 2] doubles");
  at::Tensor view = at::from_blob(out.data(), {static_cast<int64_t>(out.size()), 2},
                                  at::TensorOptions().dtype(at::kDouble));
  const double group_count = bn.sync.grad_sums(view, count);
  return {out, group_count};
}

namespace {

// packed() of the vectors get(item) of each item: one tensor written in place, no copy of the vectors.
template <typename Item, typename Get>
at::Tensor packed_from(std::initializer_list<Item> items, const Get& get, const at::Tensor& x) {
  int64_t size = 0;
  for (const Item& item : items) size += static_cast<int64_t>(get(item).size());
  at::Tensor out = at::empty({size}, at::TensorOptions().dtype(stats_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "packed", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (const Item& item : items)
      for (double value : get(item)) *dst++ = static_cast<scalar_t>(value);
  });
  return x.device().is_cpu() ? out : out.to(x.device());
}

}  // namespace

at::Tensor packed(std::initializer_list<const std::vector<double>*> values, const at::Tensor& x) {
  return packed_from(values, [](const std::vector<double>* v) -> const std::vector<double>& { return *v; }, x);
}

std::tuple<at::Tensor, at::Tensor> packed_statistics(std::initializer_list<const BatchNorm*> bns,
                                                     const at::Tensor& x) {
  return {packed_from(bns, [](const BatchNorm* bn) -> const std::vector<double>& { return bn->mean; }, x),
          packed_from(bns, [](const BatchNorm* bn) -> const std::vector<double>& { return bn->var; }, x)};
}

void batch_norm_param_grads(const BatchNorm& bn, const std::vector<GradSums>& sums, std::vector<double>& weight,
                            std::vector<double>& bias) {
  weight.resize(sums.size());
  bias.resize(sums.size());
  for (size_t c = 0; c < sums.size(); ++c) {
    weight[c] = batch_norm_weight_grad(bn.var[c], bn.eps, sums[c]);
    bias[c] = sums[c].dy;
  }
}

std::vector<Moments> combine_planes(const std::vector<Moments>& partials, int64_t batch, int64_t channels) {
  std::vector<Moments> out(channels, Moments{0, 0, 0});
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c) out[c] = combine(out[c], partials[n * channels + c]);
  return out;
}

std::vector<GradSums> combine_planes(const std::vector<GradSums>& partials, int64_t batch, int64_t channels) {
  std::vector<GradSums> out(channels, GradSums{0, 0});
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t c = 0; c < channels; ++c) out[c] = out[c] + partials[n * channels + c];
  return out;
}

at::Tensor combine_tap_partials(const std::vector<double>& partials, int64_t batch, int64_t channels, int64_t taps,
                                const at::TensorOptions& options) {
  at::Tensor out = at::zeros({channels, taps}, at::TensorOptions().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  for (int64_t n = 0; n < batch; ++n)
    for (int64_t i = 0; i < channels * taps; ++i) dst[i] += partials[n * channels * taps + i];
  return out.to(options);
}

template <typename T>
Gate<T>::Gate(const T* data, int64_t channels, int64_t h, int64_t w, int64_t H, int64_t W, bool nearest)
    : data(data), channels(channels), h(h), w(w), H(H), W(W), nearest(nearest),
      doubled_columns(nearest && W == 2 * w) {
  if (nearest) {
    for (int64_t i = 0; i < H; ++i) row_source.push_back(nearest_source_index(i, h, H));
    for (int64_t j = 0; j < W; ++j) col_source.push_back(nearest_source_index(j, w, W));
    col_begin.assign(w + 1, W);
    for (int64_t j = W - 1; j >= 0; --j) col_begin[col_source[j]] = j;
    for (int64_t c = w - 1; c >= 0; --c) col_begin[c] = std::min(col_begin[c], col_begin[c + 1]);
    if (!doubled_columns) {
      pixel_source.resize(H * W);
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j)
          pixel_source[i * W + j] = static_cast<int32_t>(row_source[i] * w + col_source[j]);
    }
  } else {
    for (int64_t i = 0; i < H; ++i) row_taps.push_back(bilinear_tap<T>(i, h, H));
    for (int64_t j = 0; j < W; ++j) col_taps.push_back(bilinear_tap<T>(j, w, W));
  }
}

namespace {

// dst[2 k] = dst[2 k + 1] = src[k] for k < w: a row upsampled to twice its width (nearest); with `times`, those
// values times times[2 k] and times[2 k + 1] (the gate product). For float by vector permutes or unpacks: pairs of
// scalar stores were the gate product's largest cost at 28x28.
template <typename T>
void double_row(const T* src, int64_t w, T* dst, const T* times = nullptr) {
  int64_t k = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {  // 8 values to 16 by one permute, the last 8 masked: no scalar tail
    const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    for (; k < w; k += 8) {
      const int64_t count = std::min<int64_t>(8, w - k);
      const __mmask16 in = static_cast<__mmask16>((1u << count) - 1);
      const __mmask16 out = static_cast<__mmask16>((1u << (2 * count)) - 1);
      __m512 v = _mm512_maskz_permutexvar_ps(out, pairs, _mm512_maskz_loadu_ps(in, src + k));
      if (times != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(out, times + 2 * k));
      _mm512_mask_storeu_ps(dst + 2 * k, out, v);
    }
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const auto store8 = [&](int64_t at, __m256 v) {
      _mm256_storeu_ps(dst + at, times != nullptr ? _mm256_mul_ps(v, _mm256_loadu_ps(times + at)) : v);
    };
    const auto store4 = [&](int64_t at, __m128 v) {
      _mm_storeu_ps(dst + at, times != nullptr ? _mm_mul_ps(v, _mm_loadu_ps(times + at)) : v);
    };
    for (; k + 8 <= w; k += 8) {
      const __m256 v = _mm256_loadu_ps(src + k);
      const __m256 low = _mm256_unpacklo_ps(v, v), high = _mm256_unpackhi_ps(v, v);  // pairs, per 128-bit lane
      store8(2 * k, _mm256_permute2f128_ps(low, high, 0x20));
      store8(2 * k + 8, _mm256_permute2f128_ps(low, high, 0x31));
    }
    for (; k + 4 <= w; k += 4) {
      const __m128 v = _mm_loadu_ps(src + k);
      store4(2 * k, _mm_unpacklo_ps(v, v));
      store4(2 * k + 4, _mm_unpackhi_ps(v, v));
    }
  }
#endif
  for (; k < w; ++k) {
    dst[2 * k] = times != nullptr ? src[k] * times[2 * k] : src[k];
    dst[2 * k + 1] = times != nullptr ? src[k] * times[2 * k + 1] : src[k];
  }
}

}  // namespace

template <typename T>
void Gate<T>::values(int64_t n, int64_t c, int64_t row0, int64_t row1, T* out) const {
  const T* g = plane(n, c);
  if (!pixel_source.empty()) {  // nearest, odd W: one gather over the rows (a loop per row of 7 pixels cost more)
    const int32_t* source = pixel_source.data() + row0 * W;
#pragma omp simd
    for (int64_t q = 0; q < (row1 - row0) * W; ++q) out[q] = g[source[q]];
    return;
  }
  for (int64_t i = row0; i < row1; ++i) {
    T* dst = out + (i - row0) * W;
    if (nearest) {  // doubled columns, the common case (even W): no gather
      if (i > row0 && row_source[i] == row_source[i - 1]) {  // the same source row: repeat the row above
        const T* above = dst - W;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) dst[j] = above[j];
        continue;
      }
      double_row(g + row_source[i] * w, w, dst);
      continue;
    }
    const BilinearTap<T> r = row_taps[i];
    const T* top = g + r.i0 * w;
    const T* bottom = g + r.i1 * w;
    for (int64_t j = 0; j < W; ++j) {
      const BilinearTap<T> t = col_taps[j];
      dst[j] = r.w0 * (t.w0 * top[t.i0] + t.w1 * top[t.i1]) + r.w1 * (t.w0 * bottom[t.i0] + t.w1 * bottom[t.i1]);
    }
  }
}

template <typename T>
void Gate<T>::multiply(int64_t n, int64_t c, const T* features, T* out, T* scratch) const {
  if (doubled_columns) {  // each row's gate doubled and multiplied in one go: no plane of gate values
    const T* g = plane(n, c);
    for (int64_t i = 0; i < H; ++i) double_row(g + row_source[i] * w, w, out + i * W, features + i * W);
    return;
  }
#if defined(__AVX512F__)
  // A gate plane of at most 16 values (the 3x3 gate of a 7x7 stage) in one register, upsampled by permutes over
  // pixel_source: gathers of it were the largest cost of the 7x7 stage at batch 8.
  if constexpr (std::is_same_v<T, float>) {
    if (!pixel_source.empty() && h * w <= 16) {
      const __m512 g = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (h * w)) - 1), plane(n, c));
      for (int64_t q = 0; q < H * W; q += 16) {
        const __mmask16 m = H * W - q >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (H * W - q)) - 1);
        const __m512 gate = _mm512_maskz_permutexvar_ps(m, _mm512_maskz_loadu_epi32(m, pixel_source.data() + q), g);
        _mm512_mask_storeu_ps(out + q, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, features + q), gate));
      }
      return;
    }
  }
#endif
  values(n, c, 0, H, scratch);
#pragma omp simd
  for (int64_t q = 0; q < H * W; ++q) out[q] = features[q] * scratch[q];
}

template <typename T>
void Gate<T>::reduce(const T* grad, int64_t row0, int64_t row1, T* plane) const {
  for (int64_t i = row0; i < row1; ++i) {
    const T* src = grad + (i - row0) * W;
    if (nearest) {
      T* dst = plane + row_source[i] * w;
      for (int64_t c = 0; c < w; ++c) {
        T sum = T(0);
        for (int64_t j = col_begin[c]; j < col_begin[c + 1]; ++j) sum += src[j];
        dst[c] += sum;
      }
      continue;
    }
    const BilinearTap<T> r = row_taps[i];
    T* top = plane + r.i0 * w;
    T* bottom = plane + r.i1 * w;
    for (int64_t j = 0; j < W; ++j) {
      const BilinearTap<T> t = col_taps[j];
      top[t.i0] += r.w0 * t.w0 * src[j];
      top[t.i1] += r.w0 * t.w1 * src[j];
      bottom[t.i0] += r.w1 * t.w0 * src[j];
      bottom[t.i1] += r.w1 * t.w1 * src[j];
    }
  }
}

template <typename T>
at::Tensor Gate<T>::nhwc(int64_t batch) const {
  const int64_t size = h * w;
  at::Tensor out = cached_empty({batch, size, channels}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* dst = out.template data_ptr<T>();
  for (int64_t n = 0; n < batch; ++n) transpose(plane(n, 0), channels, size, size, dst + n * size * channels, channels);
  return out;
}

template <typename T>
const T* Gate<T>::pixel(const T* nhwc_data, int64_t n, int64_t i, int64_t j, int64_t c0, int64_t count,
                        T* values) const {
  const T* base = nhwc_data + n * h * w * channels + c0;
  if (nearest) return base + (row_source[i] * w + col_source[j]) * channels;
  const BilinearTap<T> r = row_taps[i], t = col_taps[j];
  const T* a = base + (r.i0 * w + t.i0) * channels;
  const T* b = base + (r.i0 * w + t.i1) * channels;
  const T* c = base + (r.i1 * w + t.i0) * channels;
  const T* d = base + (r.i1 * w + t.i1) * channels;
#pragma omp simd
  for (int64_t ch = 0; ch < count; ++ch)
    values[ch] = r.w0 * (t.w0 * a[ch] + t.w1 * b[ch]) + r.w1 * (t.w0 * c[ch] + t.w1 * d[ch]);
  return values;
}

template <typename T>
void Gate<T>::reduce_pixel(const T* grad, int64_t n, int64_t i, int64_t j, int64_t c0, int64_t count,
                           T* nhwc_grad) const {
  T* base = nhwc_grad + n * h * w * channels + c0;
  if (nearest) {
    T* dst = base + (row_source[i] * w + col_source[j]) * channels;
#pragma omp simd
    for (int64_t ch = 0; ch < count; ++ch) dst[ch] += grad[ch];
    return;
  }
  const BilinearTap<T> r = row_taps[i], t = col_taps[j];
  const T weights[4] = {r.w0 * t.w0, r.w0 * t.w1, r.w1 * t.w0, r.w1 * t.w1};
  T* corners[4] = {base + (r.i0 * w + t.i0) * channels, base + (r.i0 * w + t.i1) * channels,
                   base + (r.i1 * w + t.i0) * channels, base + (r.i1 * w + t.i1) * channels};
  for (int corner = 0; corner < 4; ++corner) {
    T* dst = corners[corner];
    const T weight = weights[corner];
#pragma omp simd
    for (int64_t ch = 0; ch < count; ++ch) dst[ch] += weight * grad[ch];
  }
}

template struct Gate<float>;
template struct Gate<double>;

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight) {
  // mm / bmm straight into the dense output (at::matmul may fold the batch through transposes and copy).
  // oneDNN's 1x1 convolution took 0.17-0.7x bmm's time at batch 8 on <= 14x14 planes with many channels, but its
  // result there changes with the thread count (benchmarks/cpu_ops.py --gemm), which this backend promises not to
  // do; on larger planes it was up to 10x slower.
  const int64_t batch = x.size(0);
  at::Tensor out = cached_empty({batch, weight.size(0), x.size(2)}, x.options());
  if (batch == 1) {
    at::Tensor out0 = out[0];
    at::mm_out(out0, weight, x[0]);
  } else if (batch > 1) {
    at::bmm_out(out, weight.expand({batch, weight.size(0), weight.size(1)}), x);
  }
  return out;
}

namespace {

// MKL run single-threaded while it lives, in this thread. A GEMM inside one of our parallel regions runs on one
// thread anyway, but MKL picks its algorithm from its own thread count, the process's: on AVX-512 CPUs it then
// split a long reduction (a weight gradient's) differently at 1 and 2 threads, and the results differed.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;
};

// gemm(begin, length) for fixed chunks of [0, count): at most 16 of at least 64 (a multiple of 16), whatever the
// thread count: enough to share between threads, few enough that the cost per GEMM call (tens of microseconds)
// stays small next to the work. As in conv1x1_weight_grad, each GEMM runs single-threaded (SequentialBlas) inside
// the parallel region, so that the result does not depend on the thread count.
template <typename Gemm>
void for_each_gemm_chunk(int64_t count, const Gemm& gemm) {
  const int64_t chunk = std::max<int64_t>((count + 16 * 16 - 1) / (16 * 16) * 16, 64);
  const int64_t chunks = (count + chunk - 1) / chunk;
  const int threads = std::max(1, at::get_num_threads());
  const at::ThreadLocalState state;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const at::ThreadLocalStateGuard guard(state);
    const SequentialBlas sequential;
    const int64_t begin = c * chunk;
    gemm(begin, std::min(chunk, count - begin));
  }
}

}  // namespace

at::Tensor pixels_gemm(const at::Tensor& pixels, const at::Tensor& weight) {
  at::Tensor out = cached_empty({weight.size(0), pixels.size(0)}, pixels.options());
  for_each_gemm_chunk(pixels.size(0), [&](int64_t begin, int64_t length) {
    at::Tensor part = out.narrow(1, begin, length);
    at::mm_out(part, weight, pixels.narrow(0, begin, length).t());
  });
  return out;
}

at::Tensor rows_gemm(const at::Tensor& rows, const at::Tensor& weight) {
  at::Tensor out = cached_empty({rows.size(0), weight.size(1)}, rows.options());
  for_each_gemm_chunk(rows.size(0), [&](int64_t begin, int64_t length) {
    at::Tensor part = out.narrow(0, begin, length);
    at::mm_out(part, rows.narrow(0, begin, length), weight);
  });
  return out;
}

at::Tensor conv1x1_weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  // Chunks of at most chunk_size positions of one sample; the chunking depends on the shapes only.
  constexpr int64_t chunk_size = 4096;
  const int64_t batch = grad.size(0), out_channels = grad.size(1), in_channels = input.size(1);
  const int64_t size = grad.size(2);
  const int64_t per_sample = (size + chunk_size - 1) / chunk_size;
  const int64_t chunks = batch * per_sample;
  at::Tensor partials = at::empty({std::max<int64_t>(chunks, 1), out_channels, in_channels}, grad.options());
  // Each chunk's GEMM runs single-threaded (SequentialBlas) inside this parallel region, so its summation order
  // is fixed; the region is entered even for one chunk so that the GEMM never runs multi-threaded. The
  // caller's thread-local state (the dispatch keys excluded below autograd) goes with the work.
  const int threads = std::max(1, at::get_num_threads());
  const at::ThreadLocalState state;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const at::ThreadLocalStateGuard guard(state);
    const SequentialBlas sequential;
    const int64_t n = chunk / per_sample, begin = (chunk % per_sample) * chunk_size;
    const int64_t length = std::min(chunk_size, size - begin);
    at::Tensor out = partials[chunk];
    at::mm_out(out, grad[n].narrow(1, begin, length), input[n].narrow(1, begin, length).t());
  }
  if (chunks <= 1) return chunks == 1 ? partials[0] : partials[0].zero_();
  // The partials summed in chunk order in double, each element by one thread: the same order whatever the
  // thread count, and no double copy of the partials.
  const int64_t elements = out_channels * in_channels;
  at::Tensor out = at::empty({out_channels, in_channels}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv1x1_weight_grad", [&] {
    const scalar_t* src = partials.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, elements, 4096, [&](int64_t begin, int64_t end) {
      std::vector<double> sum(src + begin, src + end);
      for (int64_t chunk = 1; chunk < chunks; ++chunk) {
        const scalar_t* part = src + chunk * elements;
        for (int64_t i = begin; i < end; ++i) sum[i - begin] += part[i];
      }
      for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<scalar_t>(sum[i - begin]);
    });
  });
  return out;
}

}  // namespace ghostfused::cpu
