// The DFC attention branch on the GPU (shared by the dfc_attention and ghost_attn glue): 2x2 pooling, the (1, K)
// and (K, 1) depthwise convolutions with their BatchNorms folded on the fly, the sigmoid, and the gate applied
// to a full-resolution tensor, with their backward. The 1x1 convolution is a cuBLAS GEMM in the glue. The gate and
// all intermediates after the pooling are quarter resolution, in the accumulation type.
#include "ghostfused/cuda_common.cuh"

namespace ghostfused::cuda {
namespace {

// x and the pooled tensor (and their gradients) in the call's layout.
__host__ __device__ inline Layout input_layout(const DfcShape& s) {
  return {s.batch, s.in_channels, s.height, s.width, s.nhwc};
}
__host__ __device__ inline Layout pooled_layout(const DfcShape& s) {
  return {s.batch, s.in_channels, s.h, s.w, s.nhwc};
}
// features, the output, their gradients and product.
__host__ __device__ inline Layout feature_layout(const DfcShape& s) {
  return {s.batch, s.channels, s.height, s.width, s.nhwc};
}
// The gate and its gradient (the other quarter-resolution tensors are NCHW).
__host__ __device__ inline Layout gate_layout(const DfcShape& s) { return {s.batch, s.channels, s.h, s.w, s.nhwc}; }
// The NCHW quarter-resolution tensors z0, z1, z2 and their gradients.
__host__ __device__ inline Layout quarter_layout(const DfcShape& s) { return {s.batch, s.channels, s.h, s.w, false}; }

template <typename T>
struct Pool {
  DfcShape s;
  const T* x;
  T* pooled;
  __device__ void operator()(int64_t item) const {  // item: a pooled element, in memory order
    const Layout in = input_layout(s);
    const Element e = pooled_layout(s).first(item, 1);
    const auto at = [&](int64_t di, int64_t dj) { return to_acc(x[in.offset(e.n, e.c, 2 * e.i + di, 2 * e.j + dj)]); };
    pooled[item] = from_acc<T>(average_2x2(at(0, 0), at(0, 1), at(1, 0), at(1, 1)));
  }
};

template <typename T>
cudaError_t pool(const DfcShape& s, const void* x, void* pooled, cudaStream_t stream) {
  return for_each(pooled_layout(s).numel(), stream, Pool<T>{s, static_cast<const T*>(x), static_cast<T*>(pooled)});
}

// The input of a DFC convolution: scale * z_in + shift at quarter resolution, z_in in T or Acc.
template <typename T>
struct ConvInput {
  using Acc = acc_t<T>;
  DfcShape s;
  const void* z;
  bool is_dtype;
  const Acc *scale, *shift;
  __device__ Acc operator()(int64_t n, int64_t c, int64_t i, int64_t j) const {
    const int64_t index = ((n * s.channels + c) * s.h + i) * s.w + j;
    const Acc v = is_dtype ? to_acc(static_cast<const T*>(z)[index]) : static_cast<const Acc*>(z)[index];
    return scale[c] * v + shift[c];
  }
};

template <typename T>
struct Conv {
  using Acc = acc_t<T>;
  ConvInput<T> in;
  bool horizontal;
  const T* taps;
  Acc* out;
  __device__ void operator()(int64_t item) const {
    const DfcShape& s = in.s;
    const int64_t j = item % s.w, i = (item / s.w) % s.h, c = (item / (s.h * s.w)) % s.channels,
                  n = item / (s.channels * s.h * s.w);
    const int k = static_cast<int>(s.k);
    const T* w = taps + c * s.k;
    out[item] = depthwise_at<Acc>([&](int64_t r, int64_t q) { return in(n, c, r, q); },
                                  [&](int t) { return to_acc(w[t]); }, horizontal ? 1 : k, horizontal ? k : 1, i, j,
                                  s.h, s.w);
  }
};

template <typename T>
cudaError_t conv(const DfcShape& s, bool horizontal, const void* z_in, bool in_is_dtype, const void* scale,
                 const void* shift, const void* taps, void* z_out, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const ConvInput<T> in{s, z_in, in_is_dtype, static_cast<const Acc*>(scale), static_cast<const Acc*>(shift)};
  return for_each(s.batch * s.channels * s.h * s.w, stream,
                  Conv<T>{in, horizontal, static_cast<const T*>(taps), static_cast<Acc*>(z_out)});
}

template <typename Acc>
struct Sigmoid {  // item: a gate element, in the gate's layout
  DfcShape s;
  const Acc *z, *scale, *shift;
  Acc* gate;
  __device__ void operator()(int64_t item) const {
    const Element e = gate_layout(s).first(item, 1);
    gate[item] = sigmoid(scale[e.c] * z[quarter_layout(s).offset(e)] + shift[e.c]);
  }
};

template <typename T>
cudaError_t gate_sigmoid(const DfcShape& s, const void* z, const void* scale, const void* shift, void* gate,
                         cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(gate_layout(s).numel(), stream,
                  Sigmoid<Acc>{s, static_cast<const Acc*>(z), static_cast<const Acc*>(scale),
                               static_cast<const Acc*>(shift), static_cast<Acc*>(gate)});
}

// The upsampled gate at a full-resolution element.
template <typename Acc>
__device__ __forceinline__ Acc gate_at(const DfcShape& s, const Acc* gate, const Element& e) {
  return upsampled(gate, gate_layout(s), s.height, s.width, s.nearest, e.n, e.c, e.i, e.j);
}

// out = features times the upsampled gate, VEC consecutive elements (of a row, or of a pixel's channels) per item.
template <typename T, int VEC>
struct GateProduct {
  using Acc = acc_t<T>;
  DfcShape s;
  const T* features;
  const Acc* gate;
  T* out;
  __device__ void operator()(int64_t item) const {
    const Layout layout = feature_layout(s);
    const Element first = layout.first(item, VEC);
    const int64_t offset = layout.offset(first);
    const Vec<T, VEC> f = *reinterpret_cast<const Vec<T, VEC>*>(features + offset);
    Vec<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_acc<T>(to_acc(f.v[k]) * gate_at(s, gate, layout.next(first, k)));
    *reinterpret_cast<Vec<T, VEC>*>(out + offset) = o;
  }
};

template <typename T>
cudaError_t gate_product(const DfcShape& s, const void* features, const void* gate, void* out, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const Layout layout = feature_layout(s);
  const T* f = static_cast<const T*>(features);
  const Acc* g = static_cast<const Acc*>(gate);
  if (vectorised<T>(layout, features, out))
    return for_each(layout.numel() / kVec<T>, stream, GateProduct<T, kVec<T>>{s, f, g, static_cast<T*>(out)});
  return for_each(layout.numel(), stream, GateProduct<T, 1>{s, f, g, static_cast<T*>(out)});
}

template <typename T>
struct GateProductBackward {
  using Acc = acc_t<T>;
  DfcShape s;
  const T *grad_out, *features;
  const Acc* gate;
  T* dfeatures;
  Acc* product;
  __device__ void operator()(int64_t item) const {  // item: an element, in memory order
    const Acc go = to_acc(grad_out[item]);
    dfeatures[item] = from_acc<T>(go * gate_at(s, gate, feature_layout(s).first(item, 1)));
    product[item] = go * to_acc(features[item]);
  }
};

template <typename T>
cudaError_t gate_product_backward(const DfcShape& s, const void* grad_out, const void* features, const void* gate,
                                  void* dfeatures, void* product, cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(feature_layout(s).numel(), stream,
                  GateProductBackward<T>{s, static_cast<const T*>(grad_out), static_cast<const T*>(features),
                                         static_cast<const Acc*>(gate), static_cast<T*>(dfeatures),
                                         static_cast<Acc*>(product)});
}

// dgate at one gate element: its full-resolution readers' products, weighted, rows then columns in order.
template <typename Acc>
struct GateGrad {
  DfcShape s;
  const Acc* product;
  Acc* dgate;
  // item: a gate element, in the gate's layout (in NHWC a warp's threads are adjacent channels of one gate pixel and
  // read product coalesced).
  __device__ void operator()(int64_t item) const {
    const Element e = gate_layout(s).first(item, 1);
    const int64_t n = e.n, c = e.c, gi = e.i, gj = e.j;
    const TapRange rows = upsample_readers(gi, s.h, s.height, s.nearest);
    const TapRange cols = upsample_readers(gj, s.w, s.width, s.nearest);
    const Layout layout = feature_layout(s);
    Acc sum = Acc(0);
    for (int64_t i = rows.lo; i < rows.hi; ++i) {
      const Acc wr = upsample_weight<Acc>(i, gi, s.h, s.height, s.nearest);
      if (wr == Acc(0)) continue;
      Acc row = Acc(0);
      for (int64_t j = cols.lo; j < cols.hi; ++j)
        row += upsample_weight<Acc>(j, gj, s.w, s.width, s.nearest) * product[layout.offset(n, c, i, j)];
      sum += wr * row;
    }
    dgate[item] = sum;
  }
};

template <typename T>
cudaError_t gate_grad(const DfcShape& s, const void* product, void* dgate, cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(s.batch * s.channels * s.h * s.w, stream,
                  GateGrad<Acc>{s, static_cast<const Acc*>(product), static_cast<Acc*>(dgate)});
}

template <typename Acc>
struct SigmoidBackward {  // item: a gate element, in the gate's layout; du is NCHW
  DfcShape s;
  const Acc *dgate, *gate;
  Acc* du;
  __device__ void operator()(int64_t item) const {
    du[quarter_layout(s).offset(gate_layout(s).first(item, 1))] = sigmoid_backward(dgate[item], gate[item]);
  }
};

template <typename T>
cudaError_t sigmoid_grad(const DfcShape& s, const void* dgate, const void* gate, void* du, cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(gate_layout(s).numel(), stream,
                  SigmoidBackward<Acc>{s, static_cast<const Acc*>(dgate), static_cast<const Acc*>(gate),
                                       static_cast<Acc*>(du)});
}

// A quarter-resolution tensor z in T or Acc, read as Acc.
template <typename T>
struct Quarter {
  using Acc = acc_t<T>;
  const void* z;
  bool is_dtype;
  __device__ Acc operator[](int64_t index) const {
    return is_dtype ? to_acc(static_cast<const T*>(z)[index]) : static_cast<const acc_t<T>*>(z)[index];
  }
};

template <typename T>
struct DfcGradTerms {
  using Acc = acc_t<T>;
  DfcShape s;
  const Acc* du;
  Quarter<T> z;
  const double* mean;
  __device__ void operator()(int64_t c, int64_t n, int64_t l, double& dy, double& dy_centered) const {
    const int64_t index = (n * s.channels + c) * s.h * s.w + l;
    dy = static_cast<double>(du[index]);
    dy_centered = dy * (static_cast<double>(z[index]) - mean[c]);
  }
};

template <typename T>
cudaError_t dfc_grad_sums(const DfcShape& s, const void* du, const void* z, bool z_is_dtype, const double* mean,
                          void* partials, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const int64_t size = s.h * s.w;
  return reduce_grad_sums(DfcGradTerms<T>{s, static_cast<const Acc*>(du), Quarter<T>{z, z_is_dtype}, mean}, s.batch,
                          size, s.channels, false, static_cast<GradSums*>(partials), stream);
}

template <typename T>
struct InputGrad {
  using Acc = acc_t<T>;
  int64_t channels, size;
  const Acc* du;
  Quarter<T> z;
  const Acc *a, *b, *c;
  Acc* dz;
  __device__ void operator()(int64_t item) const {
    const int64_t ch = (item / size) % channels;
    dz[item] = a[ch] * du[item] + b[ch] * z[item] + c[ch];
  }
};

template <typename T>
cudaError_t input_grad(const DfcShape& s, const void* du, const void* z, bool z_is_dtype, const void* coef_a,
                       const void* coef_b, const void* coef_c, void* dz, cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(s.batch * s.channels * s.h * s.w, stream,
                  InputGrad<T>{s.channels, s.h * s.w, static_cast<const Acc*>(du), Quarter<T>{z, z_is_dtype},
                               static_cast<const Acc*>(coef_a), static_cast<const Acc*>(coef_b),
                               static_cast<const Acc*>(coef_c), static_cast<Acc*>(dz)});
}

template <typename T>
struct ConvTapTerm {  // dz times the input of tap t
  using Acc = acc_t<T>;
  ConvInput<T> in;
  bool horizontal;
  const Acc* dz;
  __device__ double operator()(int64_t c, int64_t n, int64_t l, int t) const {
    const DfcShape& s = in.s;
    const int64_t pad = s.k / 2;
    const int64_t i = l / s.w + (horizontal ? 0 : t - pad), j = l % s.w + (horizontal ? t - pad : 0);
    if (i < 0 || i >= s.h || j < 0 || j >= s.w) return 0.0;
    return static_cast<double>(dz[(n * s.channels + c) * s.h * s.w + l]) * static_cast<double>(in(n, c, i, j));
  }
};

template <typename T>
struct ConvTransposed {
  using Acc = acc_t<T>;
  DfcShape s;
  bool horizontal;
  const T* taps;
  const Acc* dz;
  Acc* du;
  __device__ void operator()(int64_t item) const {
    const int64_t j = item % s.w, i = (item / s.w) % s.h, plane = item / (s.h * s.w), c = plane % s.channels;
    const int k = static_cast<int>(s.k);
    const Acc* g = dz + plane * s.h * s.w;
    const T* w = taps + c * s.k;
    du[item] = depthwise_transposed_at<Acc>([&](int64_t r, int64_t q) { return g[r * s.w + q]; },
                                            [&](int t) { return to_acc(w[t]); }, horizontal ? 1 : k,
                                            horizontal ? k : 1, i, j, s.h, s.w);
  }
};

template <typename T>
cudaError_t conv_backward(const DfcShape& s, bool horizontal, const void* dz, const void* z_in, bool in_is_dtype,
                          const void* scale, const void* shift, const void* taps, double* tap_partials, void* du_in,
                          cudaStream_t stream) {
  using Acc = acc_t<T>;
  const ConvInput<T> in{s, z_in, in_is_dtype, static_cast<const Acc*>(scale), static_cast<const Acc*>(shift)};
  const int64_t size = s.h * s.w;
  const cudaError_t error = reduce_tap_sums(ConvTapTerm<T>{in, horizontal, static_cast<const Acc*>(dz)}, s.batch, size,
                                            s.channels, static_cast<int>(s.k), false, tap_partials, stream);
  if (error != cudaSuccess) return error;
  return for_each(s.batch * s.channels * size, stream,
                  ConvTransposed<T>{s, horizontal, static_cast<const T*>(taps), static_cast<const Acc*>(dz),
                                    static_cast<Acc*>(du_in)});
}

template <typename T>
struct PoolBackward {
  DfcShape s;
  const T* pooled_grad;
  T* dx;
  bool accumulate;
  __device__ void operator()(int64_t item) const {  // item: an element of dx, in memory order
    using Acc = acc_t<T>;
    const Element e = input_layout(s).first(item, 1);
    Acc grad = Acc(0);  // zero in the row / column the pooling dropped
    if (e.i < 2 * s.h && e.j < 2 * s.w)
      grad = to_acc(pooled_grad[pooled_layout(s).offset(e.n, e.c, e.i / 2, e.j / 2)]) * Acc(0.25);
    dx[item] = from_acc<T>(accumulate ? to_acc(dx[item]) + grad : grad);
  }
};

template <typename T>
cudaError_t pool_backward(const DfcShape& s, const void* pooled_grad, void* dx, bool accumulate,
                          cudaStream_t stream) {
  return for_each(input_layout(s).numel(), stream,
                  PoolBackward<T>{s, static_cast<const T*>(pooled_grad), static_cast<T*>(dx), accumulate});
}

}  // namespace

cudaError_t launch_average_pool(DType dtype, const DfcShape& shape, const void* x, void* pooled,
                                cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, pool, shape, x, pooled, stream);
}

cudaError_t launch_dfc_conv(DType dtype, const DfcShape& shape, bool horizontal, const void* z_in, bool in_is_dtype,
                            const void* scale, const void* shift, const void* taps, void* z_out,
                            cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, conv, shape, horizontal, z_in, in_is_dtype, scale, shift, taps, z_out, stream);
}

cudaError_t launch_dfc_sigmoid(DType dtype, const DfcShape& shape, const void* z, const void* scale,
                               const void* shift, void* gate, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, gate_sigmoid, shape, z, scale, shift, gate, stream);
}

cudaError_t launch_gate_product(DType dtype, const DfcShape& shape, const void* features, const void* gate,
                                void* out, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, gate_product, shape, features, gate, out, stream);
}

cudaError_t launch_gate_product_backward(DType dtype, const DfcShape& shape, const void* grad_out,
                                         const void* features, const void* gate, void* dfeatures, void* product,
                                         cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, gate_product_backward, shape, grad_out, features, gate, dfeatures, product, stream);
}

cudaError_t launch_gate_grad(DType dtype, const DfcShape& shape, const void* product, void* dgate,
                             cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, gate_grad, shape, product, dgate, stream);
}

cudaError_t launch_sigmoid_backward(DType dtype, const DfcShape& shape, const void* dgate, const void* gate,
                                    void* du, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, sigmoid_grad, shape, dgate, gate, du, stream);
}

cudaError_t launch_dfc_grad_sums(DType dtype, const DfcShape& shape, const void* du, const void* z, bool z_is_dtype,
                                 const double* mean, void* partials, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, dfc_grad_sums, shape, du, z, z_is_dtype, mean, partials, stream);
}

cudaError_t launch_dfc_input_grad(DType dtype, const DfcShape& shape, const void* du, const void* z, bool z_is_dtype,
                                  const void* coef_a, const void* coef_b, const void* coef_c, void* dz,
                                  cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, input_grad, shape, du, z, z_is_dtype, coef_a, coef_b, coef_c, dz, stream);
}

cudaError_t launch_dfc_conv_backward(DType dtype, const DfcShape& shape, bool horizontal, const void* dz,
                                     const void* z_in, bool in_is_dtype, const void* scale, const void* shift,
                                     const void* taps, double* tap_partials, void* du_in, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, conv_backward, shape, horizontal, dz, z_in, in_is_dtype, scale, shift, taps,
                      tap_partials, du_in, stream);
}

cudaError_t launch_pool_backward(DType dtype, const DfcShape& shape, const void* pooled_grad, void* dx,
                                 bool accumulate, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, pool_backward, shape, pooled_grad, dx, accumulate, stream);
}

}  // namespace ghostfused::cuda
