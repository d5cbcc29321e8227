// Index maps of the DFC gate, shared by the CPU and CUDA kernels: the 2x2 average pooling that makes the gate's
// input and the nearest / bilinear upsampling that brings the gate back to full resolution.
#pragma once

#include <stdint.h>

#include "ghostfused/macros.h"

namespace ghostfused {

// avg_pool2d(kernel_size=2, stride=2) floors: an odd last row / column is dropped.
GF_INLINE int64_t pooled_size(int64_t size) { return size / 2; }

// The average of one 2x2 window, summed in PyTorch's order (row by row).
template <typename Acc>
GF_INLINE Acc average_2x2(Acc top_left, Acc top_right, Acc bottom_left, Acc bottom_right) {
  return (top_left + top_right + bottom_left + bottom_right) * Acc(0.25);
}

// 'nearest' (PyTorch's legacy mode, not 'nearest-exact'): output index i of out_size reads source index
// floor(i * in_size / out_size), in integer math. Always < in_size for 0 <= i < out_size.
GF_INLINE int64_t nearest_source_index(int64_t i, int64_t in_size, int64_t out_size) {
  return i * in_size / out_size;
}

// One output index of a bilinear (align_corners=False) upsampling: it reads source indices i0 and i1 with
// weights w0 and w1.
template <typename Acc>
struct BilinearTap {
  int64_t i0, i1;
  Acc w0, w1;
};

// As PyTorch computes it: scale = in / out in Acc (float for float inputs, double for double),
// src = max(scale * (i + 0.5) - 0.5, 0), i0 = min(floor(src), in - 1), i1 = min(i0 + 1, in - 1),
// w1 = src - i0 clamped to [0, 1], w0 = 1 - w1.
template <typename Acc>
GF_INLINE BilinearTap<Acc> bilinear_tap(int64_t i, int64_t in_size, int64_t out_size) {
  const Acc scale = static_cast<Acc>(in_size) / static_cast<Acc>(out_size);
  Acc src = scale * (static_cast<Acc>(i) + Acc(0.5)) - Acc(0.5);
  if (src < Acc(0)) src = Acc(0);
  int64_t i0 = static_cast<int64_t>(src);  // floor, as src >= 0
  if (i0 > in_size - 1) i0 = in_size - 1;
  Acc w1 = src - static_cast<Acc>(i0);
  w1 = w1 < Acc(0) ? Acc(0) : (w1 > Acc(1) ? Acc(1) : w1);
  return {i0, i0 < in_size - 1 ? i0 + 1 : i0, Acc(1) - w1, w1};
}

}  // namespace ghostfused
