// The Ghost module's primary and cheap branches on the GPU (shared by the ghost_concat and ghost_attn glue).
//
// The primary 1x1 convolution y1 is a cuBLAS GEMM in the glue. Everything after it is recomputed from y1 where it
// is needed: a1 = act(BN0(y1)) on the fly, the cheap depthwise convolution from a1 (ghostfused/depthwise.h), so
// the forward writes the output once (with the upsampled gate, at quarter resolution, applied in that write) and
// the backward keeps a single full-resolution intermediate per cheap channel (dy2).
#include "ghostfused/cuda_common.cuh"

namespace ghostfused::cuda {
namespace {

// The device view of GhostArgs for element type T.
template <typename T>
struct Ghost {
  using Acc = acc_t<T>;
  GhostShape s;
  const T* y1;
  const T* cheap_weight;
  const Acc *scale0, *shift0, *scale1, *shift1;
  const Acc* gate;
  int64_t gate_h, gate_w;
  bool nearest;

  static Ghost of(const GhostArgs& a) {
    return {a.shape,
            static_cast<const T*>(a.y1),
            static_cast<const T*>(a.cheap_weight),
            static_cast<const Acc*>(a.scale0),
            static_cast<const Acc*>(a.shift0),
            static_cast<const Acc*>(a.scale1),
            static_cast<const Acc*>(a.shift1),
            static_cast<const Acc*>(a.gate.data),
            a.gate.h,
            a.gate.w,
            a.gate.nearest};
  }

  // A full-resolution tensor of `channels` channels in the call's layout.
  __host__ __device__ Layout layout(int64_t channels) const { return {s.batch, channels, s.height, s.width, s.nhwc}; }

  __device__ int64_t plane_index(int64_t n, int64_t channels, int64_t c, int64_t i, int64_t j) const {
    return layout(channels).offset(n, c, i, j);
  }

  // act(BN0(y1)) of primary channel c at (i, j).
  __device__ Acc a1(int64_t n, int64_t c, int64_t i, int64_t j) const {
    return activate(scale0[c] * to_acc(y1[plane_index(n, s.init, c, i, j)]) + shift0[c], s.relu);
  }

  // The cheap depthwise convolution (before its BatchNorm) of cheap channel j at (i, col).
  __device__ Acc y2(int64_t n, int64_t j, int64_t i, int64_t col) const {
    const int64_t c = j / s.multiplier;
    const T* taps = cheap_weight + j * s.dw * s.dw;
    const int k = static_cast<int>(s.dw);
    return depthwise_at<Acc>([&](int64_t r, int64_t q) { return a1(n, c, r, q); },
                             [&](int t) { return to_acc(taps[t]); }, k, k, i, col, s.height, s.width);
  }

  // The ungated output channel oc at (i, j): act(BN0(y1)) or act(BN1(y2)).
  __device__ Acc ungated(int64_t n, int64_t oc, int64_t i, int64_t j) const {
    if (oc < s.init) return a1(n, oc, i, j);
    const int64_t c = oc - s.init;
    return activate(scale1[c] * y2(n, c, i, j) + shift1[c], s.relu);
  }

  // The upsampled gate of output channel oc at (i, j); 1 without a gate.
  __device__ Acc gate_at(int64_t n, int64_t oc, int64_t i, int64_t j) const {
    if (gate == nullptr) return Acc(1);
    return upsampled(gate, Layout{s.batch, s.oup, gate_h, gate_w, s.nhwc}, s.height, s.width, nearest, n, oc, i, j);
  }
};

// out = the Ghost output times the gate, VEC consecutive elements (of a row, or of a pixel's channels) per item.
template <typename T, int VEC>
struct Write {
  Ghost<T> g;
  T* out;
  __device__ void operator()(int64_t item) const {
    const Layout layout = g.layout(g.s.oup);
    const Element first = layout.first(item, VEC);
    Vec<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const Element e = layout.next(first, k);
      o.v[k] = from_acc<T>(g.ungated(e.n, e.c, e.i, e.j) * g.gate_at(e.n, e.c, e.i, e.j));
    }
    *reinterpret_cast<Vec<T, VEC>*>(out + layout.offset(first)) = o;
  }
};

template <typename T>
cudaError_t write(const GhostArgs& args, void* out, cudaStream_t stream) {
  const Ghost<T> g = Ghost<T>::of(args);
  const Layout layout = g.layout(args.shape.oup);
  if (vectorised<T>(layout, out))
    return for_each(layout.numel() / kVec<T>, stream, Write<T, kVec<T>>{g, static_cast<T*>(out)});
  return for_each(layout.numel(), stream, Write<T, 1>{g, static_cast<T*>(out)});
}

template <typename T>
struct CheapValue {  // value(j, n, l) = y2 of cheap channel j
  Ghost<T> g;
  __device__ double operator()(int64_t j, int64_t n, int64_t l) const {
    return static_cast<double>(g.y2(n, j, l / g.s.width, l % g.s.width));
  }
};

template <typename T>
cudaError_t cheap_moments(const GhostArgs& args, void* partials, cudaStream_t stream) {
  const GhostShape& s = args.shape;
  const int64_t size = s.height * s.width;
  return reduce_moments(CheapValue<T>{Ghost<T>::of(args)}, s.batch, size, s.cheap, s.nhwc,
                        static_cast<Moments*>(partials), stream);
}

// The cheap branch's backward at one element: the BatchNorm-output gradient dv with its sums; with `write`, also
// dy2 = a dv + b y2 + c and the gate's product.
template <typename T>
struct CheapGrad {
  using Acc = acc_t<T>;
  Ghost<T> g;
  const T* grad_out;
  const double* mean;
  const Acc *coef_a, *coef_b, *coef_c;  // null: sums only
  Acc* dy2;
  Acc* product;
  __device__ void operator()(int64_t j, int64_t n, int64_t l, double& dy, double& dy_centered) const {
    const GhostShape& s = g.s;
    const int64_t och = s.init + j, i = l / s.width, col = l % s.width;
    const int64_t index = g.plane_index(n, s.cheap, j, i, col);
    if (och >= s.oup) {  // dropped by [:oup]: no gradient
      if (dy2 != nullptr) dy2[index] = Acc(0);
      return;
    }
    const Acc y = g.y2(n, j, i, col);
    const Acc a2 = activate(g.scale1[j] * y + g.shift1[j], s.relu);
    const Acc go = to_acc(grad_out[g.plane_index(n, s.oup, och, i, col)]);
    const Acc dv = activation_backward(go * g.gate_at(n, och, i, col), a2, s.relu);
    dy = static_cast<double>(dv);
    dy_centered = static_cast<double>(dv) * (static_cast<double>(y) - mean[j]);
    if (dy2 != nullptr) dy2[index] = coef_a[j] * dv + coef_b[j] * y + coef_c[j];
    if (product != nullptr) product[g.plane_index(n, s.oup, och, i, col)] = go * a2;
  }
};

template <typename T>
cudaError_t cheap_grad(const GhostArgs& args, const void* grad_out, const void* coef_a, const void* coef_b,
                       const void* coef_c, const double* mean, void* dy2, void* product, void* partials,
                       cudaStream_t stream) {
  using Acc = acc_t<T>;
  const GhostShape& s = args.shape;
  const int64_t size = s.height * s.width;
  const CheapGrad<T> terms{Ghost<T>::of(args),
                           static_cast<const T*>(grad_out),
                           mean,
                           static_cast<const Acc*>(coef_a),
                           static_cast<const Acc*>(coef_b),
                           static_cast<const Acc*>(coef_c),
                           static_cast<Acc*>(dy2),
                           static_cast<Acc*>(product)};
  return reduce_grad_sums(terms, s.batch, size, s.cheap, s.nhwc, static_cast<GradSums*>(partials), stream);
}

template <typename T>
struct CheapTapTerm {  // dy2 times the input of tap t
  using Acc = acc_t<T>;
  Ghost<T> g;
  const Acc* dy2;
  __device__ double operator()(int64_t j, int64_t n, int64_t l, int t) const {
    const GhostShape& s = g.s;
    const int64_t pad = s.dw / 2;
    const int64_t i = l / s.width, col = l % s.width, r = i + t / s.dw - pad, q = col + t % s.dw - pad;
    if (r < 0 || r >= s.height || q < 0 || q >= s.width) return 0.0;
    return static_cast<double>(dy2[g.plane_index(n, s.cheap, j, i, col)]) *
           static_cast<double>(g.a1(n, j / s.multiplier, r, q));
  }
};

template <typename T>
cudaError_t cheap_weight_grad(const GhostArgs& args, const void* dy2, double* partials, cudaStream_t stream) {
  const GhostShape& s = args.shape;
  const int64_t size = s.height * s.width;
  return reduce_tap_sums(CheapTapTerm<T>{Ghost<T>::of(args), static_cast<const acc_t<T>*>(dy2)}, s.batch, size,
                         s.cheap, static_cast<int>(s.dw * s.dw), s.nhwc, partials, stream);
}

// The primary channel's backward at one element, with the sums of its BatchNorm backward.
template <typename T>
struct PrimaryGrad {
  using Acc = acc_t<T>;
  Ghost<T> g;
  const T* grad_out;
  const Acc* dy2;
  const Acc* out_scale;
  const double* mean;
  T* y1_grad;
  Acc* product;
  __device__ void operator()(int64_t c, int64_t n, int64_t l, double& dy, double& dy_centered) const {
    const GhostShape& s = g.s;
    const int64_t i = l / s.width, col = l % s.width;
    const int k = static_cast<int>(s.dw);
    Acc grad = Acc(0);  // from the cheap channels reading this primary channel (dy2 is zero for dropped ones)
    for (int64_t r = 0; r < s.multiplier; ++r) {
      const int64_t j = c * s.multiplier + r;
      const T* taps = g.cheap_weight + j * s.dw * s.dw;
      const auto dy2_at = [&](int64_t row, int64_t q) { return dy2[g.plane_index(n, s.cheap, j, row, q)]; };
      grad += depthwise_transposed_at<Acc>(dy2_at, [&](int t) { return to_acc(taps[t]); }, k, k, i, col, s.height,
                                           s.width);
    }
    const Acc a1 = g.a1(n, c, i, col);
    const Acc go = to_acc(grad_out[g.plane_index(n, s.oup, c, i, col)]);
    const Acc dv = activation_backward(go * g.gate_at(n, c, i, col) + grad, a1, s.relu);
    const int64_t index = g.plane_index(n, s.init, c, i, col);
    dy = static_cast<double>(dv);
    dy_centered = static_cast<double>(dv) * (static_cast<double>(to_acc(g.y1[index])) - mean[c]);
    y1_grad[index] = from_acc<T>(out_scale[c] * dv);
    if (product != nullptr) product[g.plane_index(n, s.oup, c, i, col)] = go * a1;
  }
};

template <typename T>
cudaError_t primary_grad(const GhostArgs& args, const void* grad_out, const void* dy2, const void* out_scale,
                         const double* mean, void* y1_grad, void* product, void* partials, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const GhostShape& s = args.shape;
  const int64_t size = s.height * s.width;
  const PrimaryGrad<T> terms{Ghost<T>::of(args),         static_cast<const T*>(grad_out),
                             static_cast<const Acc*>(dy2), static_cast<const Acc*>(out_scale),
                             mean,                         static_cast<T*>(y1_grad),
                             static_cast<Acc*>(product)};
  return reduce_grad_sums(terms, s.batch, size, s.init, s.nhwc, static_cast<GradSums*>(partials), stream);
}

}  // namespace

cudaError_t launch_ghost_write(const GhostArgs& args, void* out, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(args.dtype, write, args, out, stream);
}

cudaError_t launch_cheap_moments(const GhostArgs& args, void* partials, cudaStream_t stream) {
  if (args.shape.cheap == 0) return launched();
  GHOSTFUSED_DISPATCH(args.dtype, cheap_moments, args, partials, stream);
}

cudaError_t launch_cheap_grad_sums(const GhostArgs& args, const void* grad_out, const double* cheap_mean,
                                   void* partials, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(args.dtype, cheap_grad, args, grad_out, nullptr, nullptr, nullptr, cheap_mean, nullptr,
                      nullptr, partials, stream);
}

cudaError_t launch_cheap_backward(const GhostArgs& args, const void* grad_out, const void* coef_a,
                                  const void* coef_b, const void* coef_c, const double* cheap_mean, void* dy2,
                                  void* product, void* partials, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(args.dtype, cheap_grad, args, grad_out, coef_a, coef_b, coef_c, cheap_mean, dy2, product,
                      partials, stream);
}

cudaError_t launch_cheap_weight_grad(const GhostArgs& args, const void* dy2, double* partials, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(args.dtype, cheap_weight_grad, args, dy2, partials, stream);
}

cudaError_t launch_primary_backward(const GhostArgs& args, const void* grad_out, const void* dy2,
                                    const void* out_scale, const double* primary_mean, void* y1_grad, void* product,
                                    void* partials, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(args.dtype, primary_grad, args, grad_out, dy2, out_scale, primary_mean, y1_grad, product,
                      partials, stream);
}

}  // namespace ghostfused::cuda
