// BatchNorm statistics and coefficients on the GPU: per-channel moments by chunks, their ordered combination, the
// folded affine map and the backward coefficients, all with the shared math of ghostfused/batch_norm.h.
#include "ghostfused/cuda_common.cuh"

namespace ghostfused::cuda {
namespace {

template <typename T>
struct Plain {  // value(c, n, l) = data[n, c, l] ([n, l, c] when nhwc)
  const T* data;
  int64_t channels, size;
  bool nhwc;
  __device__ double operator()(int64_t c, int64_t n, int64_t l) const {
    return static_cast<double>(to_acc(data[nhwc ? (n * size + l) * channels + c : (n * channels + c) * size + l]));
  }
};

template <typename T>
cudaError_t channel_moments(const void* data, int64_t batch, int64_t channels, int64_t size, bool nhwc,
                            void* partials, cudaStream_t stream) {
  return reduce_moments(Plain<T>{static_cast<const T*>(data), channels, size, nhwc}, batch, size, channels, nhwc,
                        static_cast<Moments*>(partials), stream);
}

struct FinishMoments {
  const Moments* partials;
  int64_t chunks, channels;
  double *mean, *var;
  __device__ void operator()(int64_t c) const {
    Moments m{0.0, 0.0, 0.0};
    for (int64_t chunk = 0; chunk < chunks; ++chunk) m = combine(m, partials[chunk * channels + c]);
    mean[c] = moments_mean(m);
    var[c] = moments_biased_var(m);
  }
};

template <typename Acc>
struct Fold {
  const double *weight, *bias, *mean, *var;
  double eps;
  Acc *scale, *shift;
  __device__ void operator()(int64_t c) const {
    const Affine<double> a = fold_batch_norm(weight[c], bias[c], mean[c], var[c], eps);
    scale[c] = static_cast<Acc>(a.scale);
    shift[c] = static_cast<Acc>(a.shift);
  }
};

template <typename T>
cudaError_t fold(const double* weight, const double* bias, const double* mean, const double* var, double eps,
                 int64_t channels, void* scale, void* shift, cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(channels, stream,
                  Fold<Acc>{weight, bias, mean, var, eps, static_cast<Acc*>(scale), static_cast<Acc*>(shift)});
}

template <typename Acc>
struct Backward {
  const double *weight, *mean, *var;
  double eps;
  const GradSums* partials;
  int64_t chunks, channels;
  double count;
  bool training;
  Acc *a, *b, *c;
  double *weight_grad, *bias_grad;
  __device__ void operator()(int64_t ch) const {
    GradSums sums{0.0, 0.0};
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sums = sums + partials[chunk * channels + ch];
    const BatchNormGrad<double> g = batch_norm_backward(weight[ch], mean[ch], var[ch], eps, sums, count, training);
    a[ch] = static_cast<Acc>(g.a);
    b[ch] = static_cast<Acc>(g.b);
    c[ch] = static_cast<Acc>(g.c);
    weight_grad[ch] = batch_norm_weight_grad(var[ch], eps, sums);
    bias_grad[ch] = sums.dy;
  }
};

template <typename T>
cudaError_t backward(const double* weight, const double* mean, const double* var, double eps, const void* partials,
                     int64_t chunks, int64_t channels, double count, bool training, void* coef_a, void* coef_b,
                     void* coef_c, double* weight_grad, double* bias_grad, cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(channels, stream,
                  Backward<Acc>{weight, mean, var, eps, static_cast<const GradSums*>(partials), chunks, channels,
                                count, training, static_cast<Acc*>(coef_a), static_cast<Acc*>(coef_b),
                                static_cast<Acc*>(coef_c), weight_grad, bias_grad});
}

template <typename T>
struct InputGrad {
  T* grad;
  const T* x;
  const acc_t<T>*a, *b, *c;
  int64_t channels, size;
  bool nhwc;
  __device__ void operator()(int64_t i) const {
    const int64_t ch = nhwc ? i % channels : (i / size) % channels;
    grad[i] = from_acc<T>(a[ch] * to_acc(grad[i]) + b[ch] * to_acc(x[i]) + c[ch]);
  }
};

template <typename T>
cudaError_t input_grad(void* grad, const void* x, const void* coef_a, const void* coef_b, const void* coef_c,
                       int64_t batch, int64_t channels, int64_t size, bool nhwc, cudaStream_t stream) {
  using Acc = acc_t<T>;
  return for_each(batch * channels * size, stream,
                  InputGrad<T>{static_cast<T*>(grad), static_cast<const T*>(x), static_cast<const Acc*>(coef_a),
                               static_cast<const Acc*>(coef_b), static_cast<const Acc*>(coef_c), channels, size,
                               nhwc});
}

}  // namespace

cudaError_t launch_channel_moments(DType dtype, const void* data, int64_t batch, int64_t channels, int64_t size,
                                   bool nhwc, void* partials, cudaStream_t stream) {
  if (channels == 0) return launched();
  GHOSTFUSED_DISPATCH(dtype, channel_moments, data, batch, channels, size, nhwc, partials, stream);
}

cudaError_t launch_finish_moments(const void* partials, int64_t chunks, int64_t channels, double* mean,
                                  double* var, cudaStream_t stream) {
  return for_each(channels, stream,
                  FinishMoments{static_cast<const Moments*>(partials), chunks, channels, mean, var});
}

cudaError_t launch_fold_batch_norm(DType dtype, const double* weight, const double* bias, const double* mean,
                                   const double* var, double eps, int64_t channels, void* scale, void* shift,
                                   cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, fold, weight, bias, mean, var, eps, channels, scale, shift, stream);
}

cudaError_t launch_batch_norm_backward(DType dtype, const double* weight, const double* mean, const double* var,
                                       double eps, const void* partials, int64_t chunks, int64_t channels,
                                       double count, bool training, void* coef_a, void* coef_b, void* coef_c,
                                       double* weight_grad, double* bias_grad, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, backward, weight, mean, var, eps, partials, chunks, channels, count, training, coef_a,
                      coef_b, coef_c, weight_grad, bias_grad, stream);
}

cudaError_t launch_batch_norm_input_grad(DType dtype, void* grad, const void* x, const void* coef_a,
                                         const void* coef_b, const void* coef_c, int64_t batch, int64_t channels,
                                         int64_t size, bool nhwc, cudaStream_t stream) {
  GHOSTFUSED_DISPATCH(dtype, input_grad, grad, x, coef_a, coef_b, coef_c, batch, channels, size, nhwc, stream);
}

}  // namespace ghostfused::cuda
