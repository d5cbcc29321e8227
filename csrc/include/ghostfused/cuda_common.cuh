// Device building blocks of the CUDA kernels (csrc/cuda/*.cu): element types and conversions, dtype dispatch,
// launch shapes, and deterministic per-channel reductions (fixed chunks, a fixed-order tree in each block).
// Only included by .cu files (nvcc); no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ghostfused/batch_norm.h"
#include "ghostfused/cuda_launchers.h"
#include "ghostfused/depthwise.h"
#include "ghostfused/index_maps.h"

namespace ghostfused::cuda {

constexpr int kBlock = 256;  // threads per block (a multiple of 32)

// The accumulation type: float for float32 / float16 / bfloat16, double for float64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// Explicit conversions (torch builds define __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__).
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// return FN<T>(args...) with T the element type of dtype.
#define GHOSTFUSED_DISPATCH(dtype, FN, ...)      \
  switch (dtype) {                               \
    case DType::Float32:                         \
      return FN<float>(__VA_ARGS__);             \
    case DType::Float64:                         \
      return FN<double>(__VA_ARGS__);            \
    case DType::Float16:                         \
      return FN<__half>(__VA_ARGS__);            \
    case DType::BFloat16:                        \
      return FN<__nv_bfloat16>(__VA_ARGS__);     \
  }                                              \
  return cudaErrorInvalidValue

// VEC consecutive elements, moved with one access (VEC = kVec<T>: 16 bytes, where `vectorised` allows).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// An element of an [N, C, H, W] tensor.
struct Element {
  int64_t n, c, i, j;
};

// A dense [N, C, H, W] tensor, NCHW or NHWC (channels_last): element offsets, and the items of the element-wise
// kernels in memory order, each VEC consecutive elements of the innermost dimension (W, or C in NHWC).
struct Layout {
  int64_t batch, channels, height, width;
  bool nhwc;

  __host__ __device__ int64_t numel() const { return batch * channels * height * width; }
  __host__ __device__ int64_t inner() const { return nhwc ? channels : width; }
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t i, int64_t j) const {
    return nhwc ? ((n * height + i) * width + j) * channels + c : ((n * channels + c) * height + i) * width + j;
  }
  __device__ __forceinline__ int64_t offset(const Element& e) const { return offset(e.n, e.c, e.i, e.j); }
  // The first element of item (items of vec elements; inner() a multiple of vec).
  __device__ __forceinline__ Element first(int64_t item, int vec) const {
    const int64_t e = item * vec;
    if (nhwc) {
      const int64_t pixel = e / channels;
      return {pixel / (height * width), e % channels, (pixel / width) % height, pixel % width};
    }
    const int64_t row = e / width;
    return {row / (height * channels), (row / height) % channels, row % height, e % width};
  }
  // Element k of the item that starts at first.
  __device__ __forceinline__ Element next(Element first, int k) const {
    (nhwc ? first.c : first.j) += k;
    return first;
  }
};

// Elements of T in one 16-byte access, and whether the element-wise kernels over layout can move that many per item:
// its innermost dimension a multiple of it and every tensor they access that way 16-byte aligned (the caching
// allocator's are; a caller's view may start anywhere).
template <typename T>
constexpr int kVec = 16 / sizeof(T);
template <typename T, typename... Pointers>
bool vectorised(const Layout& layout, const Pointers*... tensors) {
  return layout.inner() % kVec<T> == 0 && ((reinterpret_cast<uintptr_t>(tensors) % 16 == 0) && ...);
}

// Blocks of kBlock threads for a grid-stride loop over total items.
inline unsigned int grid_for(int64_t total) {
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65535 * 4 ? 65535 * 4 : blocks));
}

// The launch's own error, or an earlier one still pending.
inline cudaError_t launched() { return cudaGetLastError(); }

// Sum of v over the block's threads in a fixed order (shuffle tree in each warp, then the warps in order); the
// result is in thread 0.
template <int R>
__device__ void block_sum(double (&v)[R]) {
  __shared__ double partial[R][kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int offset = 16; offset > 0; offset /= 2) v[r] += __shfl_down_sync(0xffffffffu, v[r], offset);
    if (lane == 0) partial[r][warp] = v[r];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      v[r] = lane < kBlock / 32 ? partial[r][lane] : 0.0;
      for (int offset = 16; offset > 0; offset /= 2) v[r] += __shfl_down_sync(0xffffffffu, v[r], offset);
    }
  }
  __syncthreads();
}

// The per-channel reductions split the count = N * L values of each channel (element e = n * L + l) into chunks of
// kReduceChunk, chunk blockIdx.x, and walk a chunk in one of two ways. NCHW: the block is channel blockIdx.y and its
// threads stride over the chunk, their sums combined by block_sum (in thread 0). NHWC, where a channel's values are
// C apart: each thread is a channel (blockIdx.y * kBlock + threadIdx.x, so a warp reads 32 adjacent channels) and
// walks the chunk in order by itself. Either way the partial of (chunk, channel) is one fixed-order sum.
template <bool NHWC>
struct ChunkWalk {
  int64_t channel, first, end, step, count;  // values first, first + step, ... < end of the chunk's count

  __device__ ChunkWalk(int64_t channels, int64_t total) {
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * kReduceChunk;
    end = begin + kReduceChunk < total ? begin + kReduceChunk : total;
    count = end > begin ? end - begin : 0;
    channel = NHWC ? blockIdx.y * kBlock + threadIdx.x : blockIdx.y;
    first = NHWC ? begin : begin + threadIdx.x;
    step = NHWC ? 1 : kBlock;
    if (NHWC && channel >= channels) first = end;  // past the last channel: no values, no partial
  }
  // The chunk's sums of v: block_sum over the block (NCHW), the thread's own (NHWC).
  template <int R>
  __device__ void sum(double (&v)[R]) const {
    if constexpr (!NHWC) block_sum(v);
  }
  // Whether this thread writes the chunk's partial.
  __device__ bool writes(int64_t channels) const { return NHWC ? channel < channels : threadIdx.x == 0; }
};

// partials[chunk][c] = Moments of value(c, n, l) over the chunk: two passes, the chunk's mean first.
template <bool NHWC, typename Value>
__global__ void channel_moments_kernel(Value value, int64_t batch, int64_t size, int64_t channels,
                                       Moments* partials) {
  const ChunkWalk<NHWC> walk(channels, batch * size);
  double sum[1] = {0.0};
  for (int64_t e = walk.first; e < walk.end; e += walk.step) sum[0] += value(walk.channel, e / size, e % size);
  walk.sum(sum);
  double mean = walk.count > 0 ? sum[0] / static_cast<double>(walk.count) : 0.0;
  if constexpr (!NHWC) {  // thread 0's, to every thread
    __shared__ double block_mean;
    if (threadIdx.x == 0) block_mean = mean;
    __syncthreads();
    mean = block_mean;
  }
  double m2[1] = {0.0};
  for (int64_t e = walk.first; e < walk.end; e += walk.step) {
    const double d = value(walk.channel, e / size, e % size) - mean;
    m2[0] += d * d;
  }
  walk.sum(m2);
  if (walk.writes(channels))
    partials[blockIdx.x * channels + walk.channel] = {static_cast<double>(walk.count), mean, m2[0]};
}

// partials[chunk][c] = GradSums of terms(c, n, l, dy, dy_centered) over the chunk.
template <bool NHWC, typename Terms>
__global__ void channel_grad_sums_kernel(Terms terms, int64_t batch, int64_t size, int64_t channels,
                                         GradSums* partials) {
  const ChunkWalk<NHWC> walk(channels, batch * size);
  double sums[2] = {0.0, 0.0};
  for (int64_t e = walk.first; e < walk.end; e += walk.step) {
    double dy = 0.0, dy_centered = 0.0;
    terms(walk.channel, e / size, e % size, dy, dy_centered);
    sums[0] += dy;
    sums[1] += dy_centered;
  }
  walk.sum(sums);
  if (walk.writes(channels)) partials[blockIdx.x * channels + walk.channel] = {sums[0], sums[1]};
}

// partials[chunk][c][t] = sum over the chunk of term(c, n, l, t), t < taps.
template <bool NHWC, typename Term>
__global__ void channel_tap_sums_kernel(Term term, int64_t batch, int64_t size, int64_t channels, int taps,
                                        double* partials) {
  const ChunkWalk<NHWC> walk(channels, batch * size);
  for (int t = 0; t < taps; ++t) {
    double sum[1] = {0.0};
    for (int64_t e = walk.first; e < walk.end; e += walk.step) sum[0] += term(walk.channel, e / size, e % size, t);
    walk.sum(sum);
    if (walk.writes(channels)) partials[(blockIdx.x * channels + walk.channel) * taps + t] = sum[0];
  }
}

// Runs body(i) for i in [0, total) over a grid-stride loop.
template <typename Body>
__global__ void for_each_kernel(int64_t total, Body body) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kBlock)
    body(i);
}

// kernel<<<grid, kBlock, 0, stream>>>(args...). The CPU tests' host emulation of the CUDA runtime
// (tests/cuda_emulation) runs the same kernels on fibers instead.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, cudaStream_t stream, const Args&... args) {
#ifdef GHOSTFUSED_CUDA_EMULATION
  emulation::run(grid, dim3(kBlock), [&] { kernel(args...); });
#else
  kernel<<<grid, kBlock, 0, stream>>>(args...);
#endif
  return launched();
}

template <typename Body>
cudaError_t for_each(int64_t total, cudaStream_t stream, Body body) {
  if (total <= 0) return launched();
  return launch(for_each_kernel<Body>, dim3(grid_for(total)), stream, total, body);
}

// The per-channel reductions' grid: (chunks, channels) blocks, or (chunks, channel groups of kBlock) in NHWC.
inline dim3 reduce_grid(int64_t count, int64_t channels, bool nhwc) {
  const int64_t groups = nhwc ? (channels + kBlock - 1) / kBlock : channels;
  return dim3(static_cast<unsigned int>(reduce_chunks(count)), static_cast<unsigned int>(groups));
}

// The per-channel reductions over batch * size values of each of `channels` channels, walked as the layout reads
// fastest (ChunkWalk).
template <typename Value>
cudaError_t reduce_moments(Value value, int64_t batch, int64_t size, int64_t channels, bool nhwc, Moments* partials,
                           cudaStream_t stream) {
  const dim3 grid = reduce_grid(batch * size, channels, nhwc);
  if (nhwc) return launch(channel_moments_kernel<true, Value>, grid, stream, value, batch, size, channels, partials);
  return launch(channel_moments_kernel<false, Value>, grid, stream, value, batch, size, channels, partials);
}

template <typename Terms>
cudaError_t reduce_grad_sums(Terms terms, int64_t batch, int64_t size, int64_t channels, bool nhwc,
                             GradSums* partials, cudaStream_t stream) {
  const dim3 grid = reduce_grid(batch * size, channels, nhwc);
  if (nhwc) return launch(channel_grad_sums_kernel<true, Terms>, grid, stream, terms, batch, size, channels, partials);
  return launch(channel_grad_sums_kernel<false, Terms>, grid, stream, terms, batch, size, channels, partials);
}

template <typename Term>
cudaError_t reduce_tap_sums(Term term, int64_t batch, int64_t size, int64_t channels, int taps, bool nhwc,
                            double* partials, cudaStream_t stream) {
  const dim3 grid = reduce_grid(batch * size, channels, nhwc);
  if (nhwc)
    return launch(channel_tap_sums_kernel<true, Term>, grid, stream, term, batch, size, channels, taps, partials);
  return launch(channel_tap_sums_kernel<false, Term>, grid, stream, term, batch, size, channels, taps, partials);
}

// The DFC gate (Acc, [N, C, h, w] in `layout`: NHWC with an NHWC call, so that the threads of a warp, adjacent
// channels there, read adjacent gate values) upsampled to full-resolution (i, j) of channel c of sample n
// (ghostfused/index_maps.h).
template <typename Acc>
__device__ __forceinline__ Acc upsampled(const Acc* gate, const Layout& layout, int64_t H, int64_t W, bool nearest,
                                         int64_t n, int64_t c, int64_t i, int64_t j) {
  const int64_t h = layout.height, w = layout.width;
  const auto at = [&](int64_t r, int64_t q) { return gate[layout.offset(n, c, r, q)]; };
  if (nearest) return at(nearest_source_index(i, h, H), nearest_source_index(j, w, W));
  const BilinearTap<Acc> r = bilinear_tap<Acc>(i, h, H), q = bilinear_tap<Acc>(j, w, W);
  return r.w0 * (q.w0 * at(r.i0, q.i0) + q.w1 * at(r.i0, q.i1)) +
         r.w1 * (q.w0 * at(r.i1, q.i0) + q.w1 * at(r.i1, q.i1));
}

// The weight with which full-resolution index i contributes to source index s of the upsampling (0 if none).
template <typename Acc>
__device__ __forceinline__ Acc upsample_weight(int64_t i, int64_t s, int64_t in_size, int64_t out_size,
                                               bool nearest) {
  if (nearest) return nearest_source_index(i, in_size, out_size) == s ? Acc(1) : Acc(0);
  const BilinearTap<Acc> t = bilinear_tap<Acc>(i, in_size, out_size);
  return (t.i0 == s ? t.w0 : Acc(0)) + (t.i1 == s ? t.w1 : Acc(0));
}

// The full-resolution indices [lo, hi) that may read source index s (exact for nearest, a superset for bilinear).
__device__ __forceinline__ TapRange upsample_readers(int64_t s, int64_t in_size, int64_t out_size, bool nearest) {
  // nearest: i * in / out == s  <=>  s * out <= i * in < (s + 1) * out.
  int64_t lo = (s * out_size + in_size - 1) / in_size, hi = ((s + 1) * out_size + in_size - 1) / in_size;
  if (!nearest) {  // bilinear: src = (i + 0.5) * in / out - 0.5 within (s - 1, s + 1)
    lo = (s - 1) * out_size / in_size - 1;
    hi = (s + 2) * out_size / in_size + 2;
  }
  lo = lo < 0 ? 0 : lo;
  hi = hi > out_size ? out_size : hi;
  return {static_cast<int>(lo), static_cast<int>(hi > lo ? hi : lo)};
}

}  // namespace ghostfused::cuda
