// Depthwise convolution taps shared by the CPU and CUDA kernels: a (kh, kw) cross-correlation with zero padding
// (kh / 2, kw / 2), taps stored row-major ([kh][kw]) and accumulated in that order.
#pragma once

#include <stdint.h>

#include "ghostfused/macros.h"

namespace ghostfused {

GF_INLINE int depthwise_padding(int k) { return k / 2; }

// The taps t in [lo, hi) of a size-k kernel whose input index i + t - k / 2 lies in [0, size).
struct TapRange {
  int lo, hi;
};

GF_INLINE TapRange tap_range(int64_t i, int64_t size, int k) {
  const int64_t pad = depthwise_padding(k);
  const int64_t lo = pad - i > 0 ? pad - i : 0;
  const int64_t hi = size + pad - i < k ? size + pad - i : k;
  return {static_cast<int>(lo), static_cast<int>(hi > lo ? hi : lo)};
}

// The outputs i in [lo, hi) of a length-size axis for which tap t reads inside [0, size): the same condition as
// tap_range, seen from the tap (the CPU kernels loop over outputs per tap).
GF_INLINE TapRange tap_outputs(int t, int64_t size, int k) {
  const int64_t shift = t - depthwise_padding(k);
  const int64_t lo = -shift > 0 ? -shift : 0;
  const int64_t hi = size - shift < size ? size - shift : size;
  return {static_cast<int>(lo), static_cast<int>(hi > lo ? hi : lo)};
}

// A strided depthwise convolution (odd k, zero padding k / 2, stride s): output i of a length-size axis reads the
// padded positions u = i * s + t (t = 0 .. k - 1), where padded position u holds input u - k / 2 (zero outside).
GF_INLINE int64_t strided_output_size(int64_t size, int k, int64_t stride) {
  return (size + 2 * depthwise_padding(k) - k) / stride + 1;
}

// The CPU kernels store each padded row split into its s stride phases, phase p holding positions u = q * s + p at
// index q, so that tap t of outputs i = 0, 1, ... reads one contiguous run: phase t % s from index i + t / s.
// Each phase holds this many positions:
GF_INLINE int64_t stride_phase_span(int64_t size, int k, int64_t stride) {
  return (size + 2 * depthwise_padding(k) + stride - 1) / stride;
}

// One output element (i, j) of the depthwise convolution of a [height, width] plane: load(r, c) reads the
// plane, tap(a * kw + b) the kernel (both as Acc). Out-of-range taps are skipped (the zero padding).
template <typename Acc, typename Load, typename Tap>
GF_INLINE Acc depthwise_at(Load load, Tap tap, int kh, int kw, int64_t i, int64_t j, int64_t height, int64_t width) {
  const TapRange rows = tap_range(i, height, kh), cols = tap_range(j, width, kw);
  const int64_t row0 = i - depthwise_padding(kh), col0 = j - depthwise_padding(kw);
  Acc acc = Acc(0);
  for (int a = rows.lo; a < rows.hi; ++a)
    for (int b = cols.lo; b < cols.hi; ++b) acc += tap(a * kw + b) * load(row0 + a, col0 + b);
  return acc;
}

// The transposed convolution at input element (i, j): the gradient it receives from the output gradient
// (load(r, c)) through the taps; the kernel rotated by 180 degrees.
template <typename Acc, typename Load, typename Tap>
GF_INLINE Acc depthwise_transposed_at(Load load, Tap tap, int kh, int kw, int64_t i, int64_t j, int64_t height,
                                      int64_t width) {
  const int taps = kh * kw;
  return depthwise_at<Acc>(load, [&](int t) { return tap(taps - 1 - t); }, kh, kw, i, j, height, width);
}

}  // namespace ghostfused
