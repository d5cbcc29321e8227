// ghost_concat on the CPU: the primary 1x1 convolution as one GEMM over the batch, then fused passes per primary
// channel plane that apply BatchNorm and the activation, run the cheap depthwise convolution of every cheap
// channel reading that plane, and write both branches straight into their channel ranges of the output.
#include "ghost_concat.h"

#include <torch/library.h>

namespace ghostfused::cpu {
namespace {

// Elements per row block of the fused write: a block's rows stay in L1 / L2 from the cheap convolution to the write.
constexpr int64_t kBlockElements = 8192;

// The number of cheap channels of primary channel c that land in the output (the others are dropped by [:oup]).
int64_t kept_cheap_channels(const GhostSizes& s, int64_t c) {
  return std::clamp<int64_t>(s.oup - s.init - c * s.multiplier, 0, s.multiplier);
}

// a1[q] = act(BN0(y[q])), q in [begin, end).
template <typename T>
void primary_values(const T* y, Affine<T> bn, bool relu, int64_t begin, int64_t end, T* a1) {
#pragma omp simd
  for (int64_t q = begin; q < end; ++q) a1[q] = activate(bn.scale * y[q] + bn.shift, relu);
}

// dgate's plane of gate channel c: grad (= grad_out * the ungated output, full resolution) reduced by the
// transposed upsampling.
template <typename T>
void gate_grad(const Gate<T>& gate, const T* grad, int64_t n, int64_t c, T* dgate) {
  T* plane = dgate + (n * gate.channels + c) * gate.h * gate.w;
  std::fill(plane, plane + gate.h * gate.w, T(0));
  gate.reduce(grad, 0, gate.H, plane);
}

// Per-thread buffers of the passes over one primary plane.
template <typename T>
struct Scratch {
  PaddedPlane<T> a1;         // act(BN0(y1)) of the plane, read by the cheap convolutions
  std::vector<T> conv;       // depthwise_rows' accumulator for border rows
  std::vector<T> gate;       // the gate at full resolution for the rows at hand
  // backward
  std::vector<T> y2;         // a cheap convolution's output
  PaddedPlane<T> dy;         // the gradient of a cheap convolution's output
  std::vector<T> a1_grad, product, rotated;

  Scratch(const GhostSizes& s, int64_t rows, bool backward)
      : a1(s.height, s.width, static_cast<int>(s.dw)), conv(rows * s.width),
        gate(std::min(s.height, rows + 2 * (s.dw / 2)) * s.width), y2(backward ? s.height * s.width : 0),
        dy(backward ? s.height : 0, s.width, static_cast<int>(s.dw)), a1_grad(backward ? s.height * s.width : 0),
        product(backward ? s.height * s.width : 0), rotated(s.dw * s.dw) {}
};

// a1 of primary plane (n, c) for the backward: the whole plane.
template <typename T>
void primary_plane(const GhostBranch<T>& g, int64_t n, int64_t c, Scratch<T>& sc) {
  primary_values(g.y1_plane(n, c), g.primary_affine[c], g.relu, 0, g.sizes.height * g.sizes.width, sc.a1.values());
}

// A backward task: primary channels [c0, c1) of sample n, with their cheap channels.
struct PrimaryBlock {
  int64_t n, c0, c1;
};

// The most primary channels per backward task over NHWC data: a pixel's grad_out values of a block are then up to a
// cache line, read once and transposed into per-thread planes.
constexpr int64_t kNhwcChannelBlock = 16;

// The planes of grad_out a backward task reads. NCHW: grad_out's own planes. NHWC: the task's channels transposed
// into per-thread planes as they are read (grad_out is read once from memory either way, and every plane loop of
// the backward stays flat).
template <typename T>
class GradOutPlanes {
 public:
  GradOutPlanes(const T* grad_out, const GhostSizes& s, bool nhwc, int64_t block)
      : grad_out_(grad_out), s_(s), nhwc_(nhwc),
        planes_(nhwc ? block * (1 + s.multiplier) * s.height * s.width : 0) {}

  // The planes of block b: its cheap channels', and its primary channels' too when `primary`.
  void load(const PrimaryBlock& b, bool primary) {
    b_ = b;
    if (!nhwc_) return;
    const int64_t size = s_.height * s_.width, j0 = b.c0 * s_.multiplier;
    const int64_t j1 = std::min(b.c1 * s_.multiplier, s_.oup - s_.init);
    const T* sample = grad_out_ + b.n * size * s_.oup;
    if (primary) transpose(sample + b.c0, size, b.c1 - b.c0, s_.oup, planes_.data(), size);
    if (j1 > j0) transpose(sample + s_.init + j0, size, j1 - j0, s_.oup, planes_.data() + (b.c1 - b.c0) * size, size);
  }

  // grad_out's plane of output channel och: a primary channel of the block or one of their kept cheap channels.
  const T* plane(int64_t och) const {
    const int64_t size = s_.height * s_.width;
    if (!nhwc_) return grad_out_ + (b_.n * s_.oup + och) * size;
    const int64_t index =
        och < s_.init ? och - b_.c0 : (b_.c1 - b_.c0) + (och - s_.init - b_.c0 * s_.multiplier);
    return planes_.data() + index * size;
  }

 private:
  const T* grad_out_;
  const GhostSizes& s_;
  bool nhwc_;
  std::vector<T> planes_;
  PrimaryBlock b_{0, 0, 0};
};

// body(block, grad_out planes, scratch) for every backward task, split over the threads: one primary plane per task
// for NCHW data; for NHWC, blocks of channels (their size does not change any result: every plane's partial sums
// are kept apart). `primary`: whether the body reads the primary channels' grad_out planes.
template <typename T, typename Body>
void for_each_primary_block(const GhostBranch<T>& g, const T* grad_out, bool primary, const Body& body) {
  const GhostSizes& s = g.sizes;
  const int64_t per_sample = (2 * at::get_num_threads() + s.batch - 1) / std::max<int64_t>(s.batch, 1);
  const int64_t block = g.nhwc ? std::clamp<int64_t>((s.init + per_sample - 1) / per_sample, 1, kNhwcChannelBlock)
                               : 1;
  const int64_t blocks = (s.init + block - 1) / block;
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, true);
    GradOutPlanes<T> planes(grad_out, s, g.nhwc, block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = (task % blocks) * block;
      const PrimaryBlock b{task / blocks, c0, std::min(s.init, c0 + block)};
      planes.load(b, primary);
      body(b, planes, sc);
    }
  });
}

template <typename T>
std::vector<Moments> cheap_moments(const GhostBranch<T>& g) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, taps = s.dw * s.dw;
  const T* cheap_weight = g.cheap_taps;
  std::vector<Moments> partials(s.batch * s.cheap);
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, s.height, true);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      primary_plane(g, n, c, sc);
      for (int64_t r = 0; r < s.multiplier; ++r) {
        const int64_t j = c * s.multiplier + r;
        T* y2 = sc.y2.data();
        depthwise_rows(sc.a1, cheap_weight + j * taps, 0, s.height, sc.conv.data(),
                       [&](int64_t q, T v) { y2[q] = v; });
        partials[n * s.cheap + j] = moments_of(y2, size);
      }
    }
  });
  return combine_planes(partials, s.batch, s.cheap);
}

// Cheap channel j of sample n, given a1 in sc.a1 and grad_out's plane of the channel: its convolution y2 into sc.y2
// and the gradient of its BatchNorm's output into sc.dy.values(); with a gate, grad_out times the ungated output into
// sc.product. Returns the BatchNorm backward's sums.
template <typename T>
GradSums cheap_channel_grad(const GhostBranch<T>& g, int64_t n, int64_t j, const T* go, const Gate<T>* gate,
                            Scratch<T>& sc) {
  const GhostSizes& s = g.sizes;
  const int64_t och = s.init + j, size = s.height * s.width;
  T* y2 = sc.y2.data();
  depthwise_rows(sc.a1, g.cheap_taps + j * s.dw * s.dw, 0, s.height, sc.conv.data(),
                 [&](int64_t q, T v) { y2[q] = v; });
  const Affine<T> bn = g.cheap_affine[j];
  const bool relu = g.relu;
  T* dv = sc.dy.values();
  if (gate == nullptr) {
#pragma omp simd
    for (int64_t q = 0; q < size; ++q)
      dv[q] = activation_backward(go[q], activate(bn.scale * y2[q] + bn.shift, relu), relu);
  } else {
    gate->values(n, och, 0, s.height, sc.gate.data());
    const T* gv = sc.gate.data();
    T* product = sc.product.data();
#pragma omp simd
    for (int64_t q = 0; q < size; ++q) {
      const T a2 = activate(bn.scale * y2[q] + bn.shift, relu);
      dv[q] = activation_backward(go[q] * gv[q], a2, relu);
      product[q] = go[q] * a2;
    }
  }
  const T mean = static_cast<T>(g.cheap_bn.mean[j]);
  return {blocked_sum<T>(0, size, [&](int64_t q) { return dv[q]; }),
          blocked_sum<T>(0, size, [&](int64_t q) { return dv[q] * (y2[q] - mean); })};
}

// The cheap BatchNorm's backward sums over the batch (training only: its coefficients depend on them).
template <typename T>
std::vector<GradSums> cheap_grad_sums(const GhostBranch<T>& g, const T* grad_out, const Gate<T>* gate) {
  const GhostSizes& s = g.sizes;
  std::vector<GradSums> partials(s.batch * s.cheap, GradSums{0, 0});
  for_each_primary_block(g, grad_out, false, [&](const PrimaryBlock& b, const GradOutPlanes<T>& go, Scratch<T>& sc) {
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const int64_t kept = kept_cheap_channels(s, c);
      if (kept == 0) continue;
      primary_plane(g, b.n, c, sc);
      for (int64_t r = 0; r < kept; ++r) {
        const int64_t j = c * s.multiplier + r;
        partials[b.n * s.cheap + j] = cheap_channel_grad(g, b.n, j, go.plane(s.init + j), gate, sc);
      }
    }
  });
  return combine_planes(partials, s.batch, s.cheap);
}

}  // namespace

template <typename T>
GhostBranch<T> ghost_branch(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight,
                            BatchNorm primary_bn, BatchNorm cheap_bn, const GhostSizes& sizes, bool relu,
                            bool batch_statistics, const at::Tensor& saved_y1) {
  const at::ScalarType dtype = c10::CppTypeToScalarType<T>::value;
  const GhostSizes& s = sizes;
  const int64_t size = s.height * s.width;
  const bool nhwc = takes_nhwc_path(x);
  GhostBranch<T> g{sizes,
                   relu,
                   nhwc,
                   (nhwc ? dense_channels_last(x, dtype) : dense(x, dtype)).view({s.batch, s.in_channels, size}),
                   dense(primary_weight, dtype).view({s.init, s.in_channels}),
                   dense(cheap_weight, dtype).view({s.cheap, s.dw * s.dw}),
                   at::Tensor(),
                   nhwc ? PlaneLayout::channel_major(s.batch, size) : PlaneLayout::nchw(s.init, size),
                   std::move(primary_bn),
                   std::move(cheap_bn),
                   {},
                   {}};
  if (!saved_y1.defined() || saved_y1.numel() == 0) {
    g.y1 = nhwc ? pixels_gemm(g.x.transpose(1, 2).reshape({s.batch * size, s.in_channels}), g.primary_weight)
                : conv1x1(g.x, g.primary_weight);
  } else {
    TORCH_CHECK(saved_y1.scalar_type() == dtype && saved_y1.numel() == s.batch * s.init * size &&
                    saved_y1.is_contiguous(),
                "saved must be the primary convolution's output its forward returned: ", s.batch * s.init * size,
                " contiguous values of ", dtype, ", got ", saved_y1.numel(), " of ", saved_y1.scalar_type());
    g.y1 = nhwc ? saved_y1.view({s.init, s.batch * size}) : saved_y1.view({s.batch, s.init, size});
  }
  g.y1_data = g.y1.template data_ptr<T>();
  g.cheap_taps = g.cheap_weight.template data_ptr<T>();
  if (batch_statistics)
    set_batch_statistics(g.primary_bn, channel_moments(g.y1_data, s.batch, s.init, size, g.y1_layout));
  g.primary_affine = folded<T>(g.primary_bn);
  if (batch_statistics) set_batch_statistics(g.cheap_bn, cheap_moments(g));
  g.cheap_affine = folded<T>(g.cheap_bn);
  return g;
}

template <typename T>
at::Tensor saved_primary(const GhostBranch<T>& g, bool training) {
  return training ? g.y1.view(-1) : at::empty({0}, g.y1.options());
}

namespace {

template <typename T>
void ghost_write_nchw(const GhostBranch<T>& g, const Gate<T>* gate, T* out) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, taps = s.dw * s.dw, pad = s.dw / 2;
  const T* cheap_weight = g.cheap_taps;
  const int64_t block = std::clamp<int64_t>(kBlockElements / std::max<int64_t>(s.width, 1), 1, s.height);
  const bool relu = g.relu;
  at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc(s, block, false);
    T* a1 = sc.a1.values();
    T* gv = sc.gate.data();
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / s.init, c = plane % s.init;
      const int64_t kept = kept_cheap_channels(s, c);
      const Affine<T> bn0 = g.primary_affine[c];
      const T* y = g.y1_plane(n, c);
      int64_t ready = 0;  // rows of a1 computed (and written to the output) so far
      for (int64_t row0 = 0; row0 < s.height; row0 += block) {
        const int64_t row1 = std::min(s.height, row0 + block);
        const int64_t needed = kept > 0 ? std::min(s.height, row1 + pad) : row1;
        if (needed > ready) {  // a1 rows, written to the output (times the gate) as they are computed
          T* o = out + (n * s.oup + c) * size;
          const int64_t q0 = ready * s.width, q1 = needed * s.width;
          if (gate == nullptr) {
#pragma omp simd
            for (int64_t q = q0; q < q1; ++q) o[q] = a1[q] = activate(bn0.scale * y[q] + bn0.shift, relu);
          } else {
            gate->values(n, c, ready, needed, gv);
            const T* gq = gv - q0;
#pragma omp simd
            for (int64_t q = q0; q < q1; ++q) {
              a1[q] = activate(bn0.scale * y[q] + bn0.shift, relu);
              o[q] = a1[q] * gq[q];
            }
          }
          ready = needed;
        }
        for (int64_t r = 0; r < kept; ++r) {  // cheap channels: convolution, BN, act, gate, one store
          const int64_t j = c * s.multiplier + r, och = s.init + j;
          const Affine<T> bn = g.cheap_affine[j];
          T* o = out + (n * s.oup + och) * size;
          if (gate == nullptr) {
            depthwise_rows(sc.a1, cheap_weight + j * taps, row0, row1, sc.conv.data(),
                           [&](int64_t q, T v) { o[q] = activate(bn.scale * v + bn.shift, relu); });
          } else {
            gate->values(n, och, row0, row1, gv);
            const T* gq = gv - row0 * s.width;
            depthwise_rows(sc.a1, cheap_weight + j * taps, row0, row1, sc.conv.data(),
                           [&](int64_t q, T v) { o[q] = activate(bn.scale * v + bn.shift, relu) * gq[q]; });
          }
        }
      }
    }
  });
}

// Elements of act(BN0(y1)) per row block of ghost_write_nhwc (rows times W times init), halo rows included.
constexpr int64_t kNhwcBlockElements = 32768;

template <typename T>
void ghost_write_nhwc(const GhostBranch<T>& g, const Gate<T>* gate, T* out) {
  const GhostSizes& s = g.sizes;
  const bool relu = g.relu;
  const int64_t H = s.height, W = s.width, init = s.init, oup = s.oup, m = s.multiplier;
  const int64_t kept = oup - init;  // cheap channels that land in the output ([:oup] drops the others)
  const int64_t k = s.dw, pad = k / 2;
  // [dw * dw, cheap]: one tap of every cheap channel contiguous.
  const at::Tensor taps_tensor = g.cheap_weight.t().contiguous();
  const T* taps = taps_tensor.template data_ptr<T>();
  const T *scale0 = g.primary_affine.scale.data(), *shift0 = g.primary_affine.shift.data();
  const T *scale1 = g.cheap_affine.scale.data(), *shift1 = g.cheap_affine.shift.data();
  const at::Tensor gate_tensor = gate != nullptr ? gate->nhwc(s.batch) : at::Tensor();
  const T* gq = gate != nullptr ? gate_tensor.template data_ptr<T>() : nullptr;
  const int64_t block = std::clamp<int64_t>(kNhwcBlockElements / std::max<int64_t>(W * init, 1), 1, H);
  const int64_t blocks = (H + block - 1) / block, row = W * init;
  // a1 rows are stored with pad zero pixels on either side ([W + 2 pad, init]), and rows outside the plane read a
  // row of zeros: every tap of every output pixel reads inside the buffer, with no bounds to clip.
  const int64_t padded_row = (W + 2 * pad) * init;
  const std::vector<T> zero_row(padded_row, T(0));
  // With one cheap channel per primary channel (ratio 2, as in GhostNetV2), cheap channel c reads a1 channel c:
  // a tap is then one FMA over a whole output row of [W, init] values, with the tap's weights repeated per pixel
  // (tap_rows), however few the channels; the 3x3 kernel takes its nine taps in one pass. Otherwise a loop per
  // pixel gathers a1 channel c / m.
  const bool flat = m == 1;
  std::vector<T> tap_rows(flat && kept > 0 ? k * k * row : 0);
  for (int64_t t = 0; t < k * k && flat && kept > 0; ++t)
    for (int64_t q = 0; q < row; ++q) tap_rows[t * row + q] = q % init < kept ? taps[t * s.cheap + q % init] : T(0);
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a1((block + 2 * pad) * padded_row, T(0)), acc(flat ? row : kept), gv(gate != nullptr ? oup : 0);
    std::vector<const T*> rows(k);  // the padded a1 rows that output row i reads
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, row0 = (task % blocks) * block, row1 = std::min(H, row0 + block);
      const int64_t lo = kept > 0 ? std::max<int64_t>(0, row0 - pad) : row0;
      const int64_t hi = kept > 0 ? std::min(H, row1 + pad) : row1;
      for (int64_t i = lo; i < hi; ++i)  // a1 = act(BN0(y1)) of the block's rows and their halo, as [W, init]
        for (int64_t c = 0; c < init; ++c) {
          const T* y = g.y1_plane(n, c) + i * W;
          T* a = a1.data() + (i - lo) * padded_row + pad * init + c;
          const T scale = scale0[c], shift = shift0[c];
          for (int64_t j = 0; j < W; ++j) a[j * init] = activate(scale * y[j] + shift, relu);
        }
      for (int64_t i = row0; i < row1; ++i) {
        for (int64_t ta = 0; ta < k; ++ta) {  // the padded row of tap row ta, from its pixel -pad
          const int64_t ii = i + ta - pad;
          rows[ta] = ii < 0 || ii >= H ? zero_row.data() : a1.data() + (ii - lo) * padded_row;
        }
        if (flat && kept > 0) {  // acc[j * init + c] = the cheap convolution of channel c at (i, j)
          T* sum = acc.data();
          const T* w = tap_rows.data();
          if (k == 3) {  // per pixel, the taps' [9, kept] weights stay in L1 (tap_rows of a wide row would not)
            const T *w0 = taps, *w1 = taps + s.cheap, *w2 = taps + 2 * s.cheap, *w3 = taps + 3 * s.cheap,
                    *w4 = taps + 4 * s.cheap, *w5 = taps + 5 * s.cheap, *w6 = taps + 6 * s.cheap,
                    *w7 = taps + 7 * s.cheap, *w8 = taps + 8 * s.cheap;
            for (int64_t j = 0; j < W; ++j) {
              const T *r0 = rows[0] + j * init, *r1 = rows[1] + j * init, *r2 = rows[2] + j * init;
              const int64_t c1 = init, c2 = 2 * init;  // tap column b reads b pixels further
              T* sj = sum + j * init;
#pragma omp simd
              for (int64_t c = 0; c < kept; ++c)
                sj[c] = w0[c] * r0[c] + w1[c] * r0[c + c1] + w2[c] * r0[c + c2] + w3[c] * r1[c] + w4[c] * r1[c + c1] +
                        w5[c] * r1[c + c2] + w6[c] * r2[c] + w7[c] * r2[c + c1] + w8[c] * r2[c + c2];
            }
          } else {
            std::fill(acc.begin(), acc.end(), T(0));
            for (int64_t t = 0; t < k * k; ++t) {
              const T* src = rows[t / k] + (t % k) * init;
              const T* wt = w + t * row;
#pragma omp simd
              for (int64_t q = 0; q < row; ++q) sum[q] += wt[q] * src[q];
            }
          }
        }
        for (int64_t j = 0; j < W; ++j) {
          T* o = out + ((n * H + i) * W + j) * oup;
          const T* a = rows[pad] + (pad + j) * init;
          const T* gp = gate != nullptr ? gate->pixel(gq, n, i, j, 0, oup, gv.data()) : nullptr;
          if (gp == nullptr) {
            std::copy(a, a + init, o);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < init; ++c) o[c] = a[c] * gp[c];
          }
          if (kept == 0) continue;
          const T* v = acc.data() + (flat ? j * init : 0);
          if (!flat) {  // the cheap convolution of this pixel, zero padding
            std::fill(acc.begin(), acc.end(), T(0));
            for (int64_t t = 0; t < k * k; ++t) {
              const T* src = rows[t / k] + (j + t % k) * init;
              const T* w = taps + t * s.cheap;
              for (int64_t c = 0; c < kept; ++c) acc[c] += w[c] * src[c / m];
            }
          }
          T* o2 = o + init;
          if (gp == nullptr) {
#pragma omp simd
            for (int64_t c = 0; c < kept; ++c) o2[c] = activate(scale1[c] * v[c] + shift1[c], relu);
          } else {
            const T* g2 = gp + init;
#pragma omp simd
            for (int64_t c = 0; c < kept; ++c) o2[c] = activate(scale1[c] * v[c] + shift1[c], relu) * g2[c];
          }
        }
      }
    }
  });
}

}  // namespace

template <typename T>
void ghost_write(const GhostBranch<T>& g, const Gate<T>* gate, T* out) {
  if (g.nhwc) {
    ghost_write_nhwc(g, gate, out);
  } else {
    ghost_write_nchw(g, gate, out);
  }
}

template <typename T>
GhostGrads ghost_backward(const GhostBranch<T>& g, const T* grad_out, const Gate<T>* gate, T* dgate,
                          bool training) {
  const GhostSizes& s = g.sizes;
  const int64_t size = s.height * s.width, taps = s.dw * s.dw;
  const double count = static_cast<double>(s.batch * size);
  const std::vector<GradSums> no_sums(s.cheap, GradSums{0, 0});
  const std::vector<BatchNormGrad<T>> cheap_coefficients = backward_coefficients<T>(
      g.cheap_bn, training ? cheap_grad_sums(g, grad_out, gate) : no_sums, count, training);
  const std::vector<BatchNormGrad<T>> eval_primary =
      backward_coefficients<T>(g.primary_bn, std::vector<GradSums>(s.init, GradSums{0, 0}), count, false);

  // One pass per primary plane: the cheap channels' backward (BatchNorm, weight gradient, transposed convolution
  // into a1's gradient), then the primary channel's (gate, activation). y1_grad (laid out like y1) holds the
  // gradient of the primary BatchNorm's output (training) or of y1 itself (eval).
  const T* cheap_weight = g.cheap_taps;
  at::Tensor y1_grad = cached_empty(g.y1.sizes(), g.y1.options());
  T* y1_grad_data = y1_grad.template data_ptr<T>();
  std::vector<GradSums> cheap_partials(s.batch * s.cheap, GradSums{0, 0});
  std::vector<GradSums> primary_partials(s.batch * s.init, GradSums{0, 0});
  std::vector<double> tap_partials(s.batch * s.cheap * taps, 0.0);
  const bool relu = g.relu;
  for_each_primary_block(g, grad_out, true, [&](const PrimaryBlock& b, const GradOutPlanes<T>& planes, Scratch<T>& sc) {
    const T* a1 = sc.a1.values();
    T* a1_grad = sc.a1_grad.data();
    const int64_t n = b.n;
    for (int64_t c = b.c0; c < b.c1; ++c) {
      const int64_t kept = kept_cheap_channels(s, c);
      const T* y = g.y1_plane(n, c);
      primary_plane(g, n, c, sc);
      if (kept == 0) std::fill(sc.a1_grad.begin(), sc.a1_grad.end(), T(0));
      for (int64_t r = 0; r < kept; ++r) {
        const int64_t j = c * s.multiplier + r;
        cheap_partials[n * s.cheap + j] = cheap_channel_grad(g, n, j, planes.plane(s.init + j), gate, sc);
        if (dgate != nullptr) gate_grad(*gate, sc.product.data(), n, s.init + j, dgate);
        const BatchNormGrad<T> k = cheap_coefficients[j];
        T* dy = sc.dy.values();
        const T* y2 = sc.y2.data();
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dy[q] = k.a * dy[q] + k.b * y2[q] + k.c;
        depthwise_weight_grad(sc.a1, dy, tap_partials.data() + (n * s.cheap + j) * taps);
        rotated_taps(cheap_weight + j * taps, static_cast<int>(s.dw), sc.rotated.data());
        if (r == 0)
          depthwise_rows(sc.dy, sc.rotated.data(), 0, s.height, sc.conv.data(),
                         [&](int64_t q, T v) { a1_grad[q] = v; });
        else
          depthwise_rows(sc.dy, sc.rotated.data(), 0, s.height, sc.conv.data(),
                         [&](int64_t q, T v) { a1_grad[q] += v; });
      }
      const T* go = planes.plane(c);
      T* dst = y1_grad_data + g.y1_layout.offset(n, c);
      if (gate == nullptr) {
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dst[q] = activation_backward(go[q] + a1_grad[q], a1[q], relu);
      } else {
        gate->values(n, c, 0, s.height, sc.gate.data());
        const T* gv = sc.gate.data();
        T* product = sc.product.data();
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) {
          dst[q] = activation_backward(go[q] * gv[q] + a1_grad[q], a1[q], relu);
          product[q] = go[q] * a1[q];
        }
        gate_grad(*gate, product, n, c, dgate);
      }
      const T mean = static_cast<T>(g.primary_bn.mean[c]);
      primary_partials[n * s.init + c] = {
          blocked_sum<T>(0, size, [&](int64_t q) { return dst[q]; }),
          blocked_sum<T>(0, size, [&](int64_t q) { return dst[q] * (y[q] - mean); })};
      if (!training) {
        const T scale = eval_primary[c].a;
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dst[q] *= scale;
      }
    }
  });

  const std::vector<GradSums> primary_sums = combine_planes(primary_partials, s.batch, s.init);
  if (training) {
    const std::vector<BatchNormGrad<T>> k = backward_coefficients<T>(g.primary_bn, primary_sums, count, true);
    at::parallel_for(0, s.batch * s.init, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / s.init, c = plane % s.init;
        const BatchNormGrad<T> kc = k[c];
        T* dst = y1_grad_data + g.y1_layout.offset(n, c);
        const T* y = g.y1_plane(n, c);
#pragma omp simd
        for (int64_t q = 0; q < size; ++q) dst[q] = kc.a * dst[q] + kc.b * y[q] + kc.c;
      }
    });
  }

  GhostGrads grads;
  if (g.nhwc) {  // y1_grad [init, N * H * W]: dx [N * H * W, Cin] is NHWC
    grads.x = rows_gemm(y1_grad.t(), g.primary_weight)
                  .view({s.batch, s.height, s.width, s.in_channels})
                  .permute({0, 3, 1, 2});
    grads.primary_weight = conv1x1_weight_grad(y1_grad.view({s.init, s.batch, size}).transpose(0, 1), g.x);
  } else {
    grads.x = conv1x1(y1_grad, g.primary_weight.t()).view({s.batch, s.in_channels, s.height, s.width});
    grads.primary_weight = conv1x1_weight_grad(y1_grad, g.x);
  }
  grads.cheap_weight = combine_tap_partials(tap_partials, s.batch, s.cheap, taps, g.x.options());
  batch_norm_param_grads(g.primary_bn, primary_sums, grads.primary_bn_weight, grads.primary_bn_bias);
  batch_norm_param_grads(g.cheap_bn, combine_planes(cheap_partials, s.batch, s.cheap), grads.cheap_bn_weight,
                         grads.cheap_bn_bias);
  return grads;
}

#define GHOSTFUSED_INSTANTIATE(T)                                                                               \
  template GhostBranch<T> ghost_branch<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, BatchNorm,    \
                                          BatchNorm, const GhostSizes&, bool, bool, const at::Tensor&);          \
  template at::Tensor saved_primary<T>(const GhostBranch<T>&, bool);                                             \
  template void ghost_write<T>(const GhostBranch<T>&, const Gate<T>*, T*);                                       \
  template GhostGrads ghost_backward<T>(const GhostBranch<T>&, const T*, const Gate<T>*, T*, bool);
GHOSTFUSED_INSTANTIATE(float)
GHOSTFUSED_INSTANTIATE(double)
#undef GHOSTFUSED_INSTANTIATE

namespace {

constexpr const char* kForward = "ghostfused_C::ghost_concat_forward";
constexpr const char* kBackward = "ghostfused_C::ghost_concat_backward";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_concat_forward(
    const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& cheap_weight, at::TensorList bn_weight,
    at::TensorList bn_bias, at::TensorList bn_mean, at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup,
    bool relu, bool training, std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const GhostSizes s = check_ghost_concat_arguments(kForward, x, primary_weight, cheap_weight, bn_weight, bn_bias,
    bn_mean, bn_var, bn_eps, oup, training && !sync.active());
  std::vector<BatchNorm> bns = batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync);
  const at::ScalarType dtype = compute_dtype(x);
  at::Tensor out = empty_output({s.batch, s.oup, s.height, s.width}, x.options().dtype(dtype), memory_format_of(x));
  at::Tensor mean, var, saved;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ghost_concat_forward", [&] {
    const GhostBranch<scalar_t> g = ghost_branch<scalar_t>(x, primary_weight, cheap_weight, std::move(bns[0]),
                                                           std::move(bns[1]), s, relu, training, at::Tensor());
    ghost_write<scalar_t>(g, nullptr, out.data_ptr<scalar_t>());
    std::tie(mean, var) = packed_statistics({&g.primary_bn, &g.cheap_bn}, x);
    saved = saved_primary(g, training);
  });
  return {as_output(out, x), mean, var, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_concat_backward(
    const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& x, const at::Tensor& primary_weight,
    const at::Tensor& cheap_weight, at::TensorList bn_weight, at::TensorList bn_bias, at::TensorList bn_mean,
    at::TensorList bn_var, at::ArrayRef<double> bn_eps, int64_t oup, bool relu, bool training,
    std::optional<c10::string_view> sync_group) {
  const SyncGroup sync(sync_group);
  const GhostSizes s = check_ghost_concat_arguments(kBackward, x, primary_weight, cheap_weight, bn_weight, bn_bias,
    bn_mean, bn_var, bn_eps, oup, training && !sync.active());
  check_grad_out(kBackward, grad_out, x, s.oup);
  std::vector<BatchNorm> bns = batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, sync);
  const at::ScalarType dtype = compute_dtype(x);
  const at::Tensor grad = takes_nhwc_path(x) ? dense_channels_last(grad_out, dtype) : dense(grad_out, dtype);
  GhostGrads grads;
  AT_DISPATCH_FLOATING_TYPES(dtype, "ghost_concat_backward", [&] {
    const GhostBranch<scalar_t> g = ghost_branch<scalar_t>(x, primary_weight, cheap_weight, std::move(bns[0]),
                                                           std::move(bns[1]), s, relu, false, saved);
    grads = ghost_backward<scalar_t>(g, grad.data_ptr<scalar_t>(), nullptr, nullptr, training);
  });
  return {grads.x.to(x.scalar_type()),
          grads.primary_weight.view(primary_weight.sizes()).to(x.scalar_type()),
          grads.cheap_weight.view(cheap_weight.sizes()).to(x.scalar_type()),
          packed({&grads.primary_bn_weight, &grads.cheap_bn_weight}, x),
          packed({&grads.primary_bn_bias, &grads.cheap_bn_bias}, x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ghostfused_C, CPU, m) {
  m.impl("ghost_concat_forward", &ghost_concat_forward);
  m.impl("ghost_concat_backward", &ghost_concat_backward);
}

}  // namespace ghostfused::cpu
