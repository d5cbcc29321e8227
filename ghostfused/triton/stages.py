"""The kernels of a fused Ghost module and the forward / backward that chain them, for any of the three ops.

A call has a Ghost part (primary 1x1 conv + BN + act, cheap depthwise conv + BN + act, concatenated), a DFC part
(2x2 average pool, 1x1 conv + BN, (1, K) depthwise + BN, (K, 1) depthwise + BN, sigmoid, upsample) or both; without
the Ghost part the gate multiplies ``features`` (``dfc_attention``). Names: x [N, Cin, H, W]; y1 = primary conv
output [N, init, H, W]; y2 = cheap conv output [N, new, H, W]; z0, z1, z2 = the DFC conv outputs [N, C, h, w] with
h, w = H // 2, W // 2; "cells" are gate pixels, each owning the full-resolution pixels ("children") that take it
as their nearest (or bilinear top-left) source.

Forward kernels (``_project`` and the DFC convs run again in backward, to recompute instead of store):

* ``_project_kernel``: one pass over x in 2x2 quads: y1 = primary_w @ x and z0 = conv_w @ avg_pool(x) (the pooled
  quad is summed in registers), both stored raw; in training, per-tile moments of both.
* ``_cheap_moments_kernel`` (training): per-tile moments of y2 = depthwise(act(bn(y1))), which is not stored.
* ``_dfc_conv_kernel``: z1 = (1, K) conv of bn(z0), z2 = (K, 1) conv of bn(z1), stored raw; moments in training.
* ``_write_kernel``: the output, written once: per cell, the gate sigmoid(bn(z2)) (and its bilinear neighbours),
  then per child act(bn(y1)) into channels [0, init) and act(bn(depthwise(act(bn(y1))))) into [init, oup) (or
  ``features``), times the gate.

Backward kernels: ``_write_grad_kernel`` (per cell: the cheap BN input gradient, its sums, and the gate gradient
reduced over the cell's children), ``_gate_grad_kernel`` (bilinear: gathers the four neighbour contributions),
``_dfc_conv_grad_kernel`` (transposed (K, 1) then (1, K) conv, their weight-gradient partials and BN sums),
``_cheap_grad_kernel`` (transposed depthwise conv into the primary branch, depthwise weight-gradient partials),
``_project_grad_kernel`` (dx = primary_w^T dy1 + upsampled conv_w^T dz0 / 4) and ``_project_weight_grad_kernel``
(split-K partials of primary_w and conv_w gradients).

The 1x1 convolutions run as ``tl.dot`` inside ``_project_kernel`` (and its backward twins) rather than as a library
GEMM (torch.matmul). Chosen by counting, not measured (no GPU in this session). For the 14 attn modules of
ghostnetv2_100 at 224x224 (Cin -> oup: 24 -> 72 at 56x56; 40 -> 120, 240 at 28x28; 80 -> 200, 184, 184, 480 and
112 -> 672 at 14x14; 160 -> 960 at 7x7) the primary GEMM does 2 * Cin * init FLOPs per pixel against a floor of
2 * (Cin + oup) bytes (bf16): 9 FLOP/B for 24 -> 72 up to 69 FLOP/B for 160 -> 960, far below an H100's ~300
FLOP/B ridge. Every module is memory-bound, so the choice is decided by bytes moved, per pixel in channels:

* fused (this file): read x once for both GEMMs (the pool is summed in registers), write y1 (init) and z0 (oup / 4);
  in training the BN moments come from the same registers.
* library GEMMs: y1 = W @ x reads x and writes y1 (the same), but the DFC GEMM needs an avg_pool pass (read x again,
  write and read the pooled Cin / 4) and, in training, the moments need another read of y1 and z0.

The fused form saves Cin + Cin / 2 (+ init + oup / 4 in training) channels per pixel: for 24 -> 72, 36 (eval) or
90 (training) against the 96 of the floor; and its K = Cin (24 to 160) suits tl.dot. The alternative would replace
``_project`` (whose outputs, raw y1 and z0 plus moments, are exactly what the GEMMs would produce) by torch.matmul
calls, a pooling and a moments kernel; it is not kept as a flag here (no dead code) until a measurement asks for it.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import backends, distributed
from ..reference import memory_format_of
from .common import (INTERPRETED, Partials, acc_dtype, autotune, bn_grad_terms, bn_params,
                     device_function, mm, offset, pixel_block, reduction_block, relu, relu_grad, scratch,
                     store_moments, store_sums, tap_block, tl_acc, upsampling)


class BatchNormArgs(NamedTuple):
    """One BatchNorm: affine parameters and the statistics it normalises with (running or batch), and eps."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


class Ghost(NamedTuple):
    """The Ghost part: primary_weight [init, Cin, 1, 1], cheap_weight [new, 1, dw, dw], its two BatchNorms."""

    primary_weight: torch.Tensor
    cheap_weight: torch.Tensor
    oup: int
    relu: bool
    primary_bn: BatchNormArgs
    cheap_bn: BatchNormArgs


class Dfc(NamedTuple):
    """The DFC part: conv_weight [C, Cin, 1, 1], horizontal [C, 1, 1, K], vertical [C, 1, K, 1], its three BNs."""

    conv_weight: torch.Tensor
    horizontal_weight: torch.Tensor
    vertical_weight: torch.Tensor
    upsample: str
    bns: tuple


def batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps) -> list[BatchNormArgs]:
    """The schema's BatchNorm lists as one :class:`BatchNormArgs` per BatchNorm, each tensor made dense: the kernels
    index the per-channel vectors with unit stride."""
    return [BatchNormArgs(w.contiguous(), b.contiguous(), m.contiguous(), v.contiguous(), eps)
            for w, b, m, v, eps in zip(bn_weight, bn_bias, bn_mean, bn_var, bn_eps)]


# ---------------------------------------------------------------------------------------------------------------
# Tile geometry.


@device_function
def _quad_tile(t, N, H, W, BQ: tl.constexpr):
    """Tile t of BQ 2x2 quads: its 4 * BQ pixels in quad-major order (n, pixel, valid) and the quads as pooled
    pixels (n, pooled pixel, valid: odd last rows / columns belong to no pooled pixel)."""
    QW = (W + 1) // 2
    quads = ((H + 1) // 2) * QW
    e = tl.arange(0, 4 * BQ)
    q = t * BQ + e // 4
    rem = q % quads
    i = 2 * (rem // QW) + (e % 4) // 2
    j = 2 * (rem % QW) + e % 2
    qp = t * BQ + tl.arange(0, BQ)
    rem_p = qp % quads
    r = rem_p // QW
    s = rem_p % QW
    pool_ok = (qp < N * quads) & (r < H // 2) & (s < W // 2)
    return q // quads, i * W + j, (q < N * quads) & (i < H) & (j < W), qp // quads, r * (W // 2) + s, pool_ok


@device_function
def _pixel_tile(t, N, H, W, BP: tl.constexpr):
    """Tile t of BP pixels over (N, H, W): n, i, j, valid, each [1, BP]."""
    e = t * BP + tl.arange(0, BP)
    p = e % (H * W)
    return (e // (H * W))[None, :], (p // W)[None, :], (p % W)[None, :], (e < N * H * W)[None, :]


@device_function
def _cell_tile(t, N, CELLS, W, children, CH: tl.constexpr, BQ: tl.constexpr):
    """Tile t of BQ cells, (n, cell, valid) [1, BQ], and their children, flattened cell-major, (n, i, j, valid)
    [1, BQ * CH], from the per-image table of each cell's CH children (pixel index, -1 for padding)."""
    q = t * BQ + tl.arange(0, BQ)
    e = tl.arange(0, BQ * CH)
    qe = t * BQ + e // CH
    p = tl.load(children + (qe % CELLS) * CH + e % CH, mask=qe < N * CELLS, other=-1)
    return ((q // CELLS)[None, :], (q % CELLS)[None, :], (q < N * CELLS)[None, :], (qe // CELLS)[None, :],
            (p // W)[None, :], (p % W)[None, :], (p >= 0)[None, :])


@device_function
def _to_children(v, BQ: tl.constexpr, CH: tl.constexpr):
    """Cell values [B, BQ] repeated for each child: [B, BQ * CH]."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (v.shape[0], BQ, CH)), (v.shape[0], BQ * CH))


@device_function
def _sum_children(v, BQ: tl.constexpr, CH: tl.constexpr):
    """Child values [B, BQ * CH] summed per cell: [B, BQ]."""
    return tl.sum(tl.reshape(v, (v.shape[0], BQ, CH)), axis=2)


@device_function
def _channel_block(pid, INIT, CHEAP, C_OUT, GHOST: tl.constexpr, BC: tl.constexpr):
    """Channels [BC] of block ``pid``: with a Ghost part, primary blocks come first, then blocks of the first CHEAP
    cheap channels; else the features' channels. Returns (is_cheap, channel in its branch, its mask, output
    channel, output mask)."""
    lane = tl.arange(0, BC)
    if GHOST:
        primary_blocks = tl.cdiv(INIT, BC)
        cheap = pid >= primary_blocks
        c = tl.where(cheap, pid - primary_blocks, pid) * BC + lane
        c_ok = c < tl.where(cheap, CHEAP, INIT)
        out_c = tl.where(cheap, INIT + c, c)
    else:
        cheap = pid < 0
        c = pid * BC + lane
        c_ok = c < C_OUT
        out_c = c
    return cheap, c, c_ok, out_c, c_ok & (out_c < C_OUT)


# ---------------------------------------------------------------------------------------------------------------
# Values shared by several kernels. Stencils loop over blocks of TB taps (see common.tap_block).


@device_function
def _cheap_conv(y1, cheap_w, n, c, c_ok, i, j, ok, H, W, INIT, M, DW: tl.constexpr, scale, shift, acc,
                RELU: tl.constexpr, CL: tl.constexpr, TB: tl.constexpr):
    """``acc`` + the depthwise conv (before its BN) of cheap channels c [B, 1] at pixels (i, j) [1, P]: taps of
    act(scale * y1 + shift) of primary channel c // M, zero outside the image (padding applies to the activation)."""
    base = (y1 + offset(n, c // M, i * W + j, INIT, H * W, CL))[:, :, None]
    step = INIT if CL else 1
    for t0 in tl.static_range(0, DW * DW, TB):
        d = t0 + tl.arange(0, TB)
        di = d // DW - DW // 2
        dj = d % DW - DW // 2
        ii = i[:, :, None] + di
        jj = j[:, :, None] + dj
        tap_ok = ok[:, :, None] & (d < DW * DW) & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        v = tl.load(base + (di * W + dj) * step, mask=c_ok[:, :, None] & tap_ok, other=0.0).to(acc.dtype)
        x1 = tl.where(tap_ok, relu(scale[:, :, None] * v + shift[:, :, None], RELU), 0.0)
        wt = tl.load(cheap_w + (c * (DW * DW))[:, :, None] + d, mask=c_ok[:, :, None] & (d < DW * DW), other=0.0)
        acc += tl.sum(wt.to(acc.dtype) * x1, axis=2)
    return acc


@device_function
def _ghost_values(cheap, y1, cheap_w, n, c, c_ok, i, j, ok, H, W, INIT, M,
                  pw, pb, pm, pv, peps, cw, cb, cm, cv, ceps, zero,
                  DW: tl.constexpr, RELU: tl.constexpr, CL: tl.constexpr, TB: tl.constexpr):
    """Ghost branch at pixels (i, j) of channels c, primary or (``cheap``) cheap: the raw conv output y, the
    pre-activation bn(y), and the BN's mean and rstd. ``zero`` fixes the shape and dtype."""
    if cheap:
        p_scale, p_shift, _, _ = bn_params(pw, pb, pm, pv, peps, c // M, c_ok, zero.dtype)
        y = _cheap_conv(y1, cheap_w, n, c, c_ok, i, j, ok, H, W, INIT, M, DW, p_scale, p_shift, zero, RELU, CL, TB)
        scale, shift, mu, rstd = bn_params(cw, cb, cm, cv, ceps, c, c_ok, zero.dtype)
    else:
        y = zero + tl.load(y1 + offset(n, c, i * W + j, INIT, H * W, CL), mask=c_ok & ok, other=0.0).to(zero.dtype)
        scale, shift, mu, rstd = bn_params(pw, pb, pm, pv, peps, c, c_ok, zero.dtype)
    return y, scale * y + shift, mu, rstd


@device_function
def _gate_corners(z2, n, c, cell, C, h, w, mask, scale, shift, BILINEAR: tl.constexpr, CL: tl.constexpr):
    """z2 and the gate sigmoid(bn(z2)) at cells ``cell`` (= r * w + s); bilinear also gives the gates of the cells
    below, to the right and below-right (clamped at the last row / column, where their weight is 0)."""
    at = z2 + offset(n, c, cell, C, h * w, CL)
    z = tl.load(at, mask=mask, other=0.0).to(scale.dtype)
    g = tl.sigmoid(scale * z + shift)
    if BILINEAR:
        step = C if CL else 1
        down = tl.where(cell // w < h - 1, w, 0) * step
        right = tl.where(cell % w < w - 1, 1, 0) * step
        g10 = tl.sigmoid(scale * tl.load(at + down, mask=mask, other=0.0).to(scale.dtype) + shift)
        g01 = tl.sigmoid(scale * tl.load(at + right, mask=mask, other=0.0).to(scale.dtype) + shift)
        g11 = tl.sigmoid(scale * tl.load(at + down + right, mask=mask, other=0.0).to(scale.dtype) + shift)
        return z, g, g10, g01, g11
    return z, g, g, g, g


@device_function
def _mix(g, g10, g01, g11, lam_r, lam_c):
    """Bilinear interpolation between a cell's gate and its neighbours' with row / column weights lam_r, lam_c."""
    top = g + (g01 - g) * lam_c
    return top + (g10 + (g11 - g10) * lam_c - top) * lam_r


@device_function
def _cell_gate(z2, n, c, cell, C, h, w, mask, scale, shift, lam_r, lam_c, BQ: tl.constexpr, CH: tl.constexpr,
               BILINEAR: tl.constexpr, CL: tl.constexpr):
    """(z2 at the cells, gate at the cells, upsampled gate at their children [B, BQ * CH])."""
    z, g, g10, g01, g11 = _gate_corners(z2, n, c, cell, C, h, w, mask, scale, shift, BILINEAR, CL)
    if BILINEAR:
        return z, g, _mix(_to_children(g, BQ, CH), _to_children(g10, BQ, CH), _to_children(g01, BQ, CH),
                          _to_children(g11, BQ, CH), lam_r, lam_c)
    return z, g, _to_children(g, BQ, CH)


@device_function
def _gate_pre_grad(grad_gate, z, g, n, rows, cell, mask, C, h, w, mu, rstd, dz2n, part, T_MAX, ROW, t,
                   CL: tl.constexpr):
    """From the gate gradient at cells [BC, BQ] of channels ``rows`` [BC]: the gradient of the last DFC BN's output
    (stored) and the tile's BN-backward sums (partial rows ROW + c and ROW + C + c)."""
    grad = grad_gate * g * (1.0 - g)
    tl.store(dz2n + offset(n, rows[:, None], cell, C, h * w, CL), grad, mask=mask)
    store_sums(part, T_MAX, ROW + rows, rows < C, t, grad, mask)
    store_sums(part, T_MAX, ROW + C + rows, rows < C, t, grad * (z - mu) * rstd, mask)


@device_function
def _bn_input_grad(grad_ptr, y_ptr, n, c, c_ok, p, ok, C, PIX, w, b, m, v, eps, grad_b, grad_w, count,
                   TRAINING: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr):
    """The gradient of a BN's input at (n, c, p) from the stored gradient of its output (and its stored input)."""
    scale, _, mu, rstd = bn_params(w, b, m, v, eps, c, c_ok, ACC)
    a, b, k0 = bn_grad_terms(grad_b, grad_w, c, c_ok, count, scale, mu, rstd, TRAINING)
    at = offset(n, c, p, C, PIX, CL)
    grad = a * tl.load(grad_ptr + at, mask=c_ok & ok, other=0.0).to(ACC)
    if TRAINING:
        grad += b * tl.load(y_ptr + at, mask=c_ok & ok, other=0.0).to(ACC) + k0
    return tl.where(c_ok & ok, grad, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Forward kernels.

# Channel blocks of 16 or 32 against the host's pixel tiles (32 pixels for the full-resolution stencils, 64 children
# per cell tile, 64 quarter-resolution pixels, 16 quads). Compiled for sm_90 (ptxas -v, no GPU), every kernel has
# configs here without register spills (the unrolled 3x3 stencils still take 120 to 190 registers); the autotuner
# chooses by measurement.
_BC_CONFIGS = [triton.Config({"BC": bc}, num_warps=nw) for bc in (16, 32) for nw in (4, 8)]
_INTERPRETED_BC = triton.Config({"BC": 32})


@autotune(_BC_CONFIGS, key=["N", "CIN", "INIT", "C_DFC", "H", "W"], interpreted=_INTERPRETED_BC)
@triton.jit
def _project_kernel(x, primary_w, dfc_w, y1, z0, moments, ROWS, T_MAX, N, CIN, H, W, INIT, C_DFC,
                    TRAINING: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr,
                    BK: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(1)
    n, p, px_ok, n_q, p_q, pool_ok = _quad_tile(t, N, H, W, BQ)
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    has_primary = tl.program_id(0) * BC < INIT
    has_pool = tl.program_id(0) * BC < C_DFC
    acc_y = tl.zeros((BC, 4 * BQ), ACC)
    acc_z = tl.zeros((BC, BQ), ACC)
    for k0 in range(0, CIN, BK):
        k = k0 + tl.arange(0, BK)
        xt = tl.load(x + offset(n[None, :], k[:, None], p[None, :], CIN, H * W, CL),
                     mask=(k < CIN)[:, None] & px_ok[None, :], other=0.0)
        if has_primary:
            wt = tl.load(primary_w + c[:, None] * CIN + k[None, :], mask=(c < INIT)[:, None] & (k < CIN)[None, :],
                         other=0.0)
            acc_y += mm(wt, xt)
        if has_pool:
            pooled = tl.sum(tl.reshape(xt.to(ACC), (BK, BQ, 4)), axis=2) * 0.25
            wt = tl.load(dfc_w + c[:, None] * CIN + k[None, :], mask=(c < C_DFC)[:, None] & (k < CIN)[None, :],
                         other=0.0)
            acc_z += mm(wt, pooled.to(xt.dtype))
    if has_primary:
        y = acc_y.to(y1.dtype.element_ty)
        mask = (c < INIT)[:, None] & px_ok[None, :]
        tl.store(y1 + offset(n[None, :], c[:, None], p[None, :], INIT, H * W, CL), y, mask=mask)
        if TRAINING:
            store_moments(moments, ROWS, T_MAX, c, c < INIT, t, y.to(ACC), mask)
    if has_pool:
        z = acc_z.to(z0.dtype.element_ty)
        mask = (c < C_DFC)[:, None] & pool_ok[None, :]
        tl.store(z0 + offset(n_q[None, :], c[:, None], p_q[None, :], C_DFC, (H // 2) * (W // 2), CL), z, mask=mask)
        if TRAINING:
            store_moments(moments, ROWS, T_MAX, INIT + c, c < C_DFC, t, z.to(ACC), mask)


@autotune(_BC_CONFIGS, key=["N", "INIT", "NEW", "H", "W", "DW"], interpreted=_INTERPRETED_BC)
@triton.jit
def _cheap_moments_kernel(y1, cheap_w, pw, pb, pm, pv, peps, moments, ROWS, T_MAX, N, H, W, INIT, NEW, M,
                          DW: tl.constexpr, RELU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                          TB: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(1)
    n, i, j, ok = _pixel_tile(t, N, H, W, BP)
    rows = tl.program_id(0) * BC + tl.arange(0, BC)
    c = rows[:, None]
    scale, shift, _, _ = bn_params(pw, pb, pm, pv, peps, c // M, c < NEW, ACC)
    y = _cheap_conv(y1, cheap_w, n, c, c < NEW, i, j, ok, H, W, INIT, M, DW, scale, shift, tl.zeros((BC, BP), ACC),
                    RELU, CL, TB)
    store_moments(moments, ROWS, T_MAX, rows, rows < NEW, t, y, (c < NEW) & ok)


@device_function
def _axis_step(h, w, C, VERTICAL: tl.constexpr, CL: tl.constexpr):
    """(length, element stride) of the axis a DFC conv runs along, in a quarter-resolution tensor."""
    if VERTICAL:
        return h, w * (C if CL else 1)
    return w, C if CL else 1


@autotune(_BC_CONFIGS, key=["N", "C", "h", "w", "K"], interpreted=_INTERPRETED_BC)
@triton.jit
def _dfc_conv_kernel(z_in, weight, iw, ib, im, iv, ieps, z_out, moments, ROWS, T_MAX, ROW, N, C, h, w,
                     K: tl.constexpr, VERTICAL: tl.constexpr, TRAINING: tl.constexpr, CL: tl.constexpr,
                     ACC: tl.constexpr, TB: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(1)
    n, r, s, ok = _pixel_tile(t, N, h, w, BQ)
    rows = tl.program_id(0) * BC + tl.arange(0, BC)
    c = rows[:, None]
    c_ok = c < C
    scale, shift, _, _ = bn_params(iw, ib, im, iv, ieps, c, c_ok, ACC)
    at = offset(n, c, r * w + s, C, h * w, CL)
    length, step = _axis_step(h, w, C, VERTICAL, CL)
    pos = (r if VERTICAL else s)[:, :, None]
    acc = tl.zeros((BC, BQ), ACC)
    for t0 in tl.static_range(0, K, TB):
        k = t0 + tl.arange(0, TB)
        tap_ok = ok[:, :, None] & (k < K) & (pos + (k - K // 2) >= 0) & (pos + (k - K // 2) < length)
        v = tl.load(z_in + at[:, :, None] + (k - K // 2) * step, mask=c_ok[:, :, None] & tap_ok, other=0.0).to(ACC)
        wt = tl.load(weight + c[:, :, None] * K + k, mask=c_ok[:, :, None] & (k < K), other=0.0).to(ACC)
        acc += tl.sum(wt * tl.where(tap_ok, scale[:, :, None] * v + shift[:, :, None], 0.0), axis=2)
    z = acc.to(z_out.dtype.element_ty)
    tl.store(z_out + at, z, mask=c_ok & ok)
    if TRAINING:
        store_moments(moments, ROWS, T_MAX, ROW + rows, rows < C, t, z.to(ACC), c_ok & ok)


@autotune(_BC_CONFIGS, key=["N", "INIT", "C_OUT", "CELLS_H", "CELLS_W", "CH"], interpreted=_INTERPRETED_BC)
@triton.jit
def _write_kernel(out, y1, cheap_w, pw, pb, pm, pv, peps, cw, cb, cm, cv, ceps, features,
                  z2, gw, gb, gm, gv, geps, children, lam_r, lam_c,
                  N, H, W, CELLS_H, CELLS_W, INIT, M, C_OUT,
                  DW: tl.constexpr, RELU: tl.constexpr, GHOST: tl.constexpr, HAS_GATE: tl.constexpr,
                  BILINEAR: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, TB: tl.constexpr, CH: tl.constexpr,
                  BQ: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(1)
    n_cell, cell, cell_ok, n, i, j, ok = _cell_tile(t, N, CELLS_H * CELLS_W, W, children, CH, BQ)
    cheap, c, c_ok, out_c, out_ok = _channel_block(tl.program_id(0), INIT, C_OUT - INIT, C_OUT, GHOST, BC)
    c, c_ok, out_c, out_ok = c[:, None], c_ok[:, None], out_c[:, None], out_ok[:, None]
    pixel = i * W + j
    zero = tl.zeros((BC, BQ * CH), ACC)
    if GHOST:
        _, pre, _, _ = _ghost_values(cheap, y1, cheap_w, n, c, c_ok, i, j, ok, H, W, INIT, M, pw, pb, pm, pv, peps,
                                     cw, cb, cm, cv, ceps, zero, DW, RELU, CL, TB)
        o = relu(pre, RELU)
    else:
        o = zero + tl.load(features + offset(n, c, pixel, C_OUT, H * W, CL), mask=c_ok & ok, other=0.0).to(ACC)
    if HAS_GATE:
        g_scale, g_shift, _, _ = bn_params(gw, gb, gm, gv, geps, out_c, out_ok, ACC)
        lr = tl.load(lam_r + i, mask=ok, other=0.0) if BILINEAR else 0.0
        lc = tl.load(lam_c + j, mask=ok, other=0.0) if BILINEAR else 0.0
        _, _, gate = _cell_gate(z2, n_cell, out_c, cell, C_OUT, CELLS_H, CELLS_W, out_ok & cell_ok, g_scale, g_shift,
                                lr, lc, BQ, CH, BILINEAR, CL)
        o = o * gate
    tl.store(out + offset(n, out_c, pixel, C_OUT, H * W, CL), o, mask=out_ok & ok)


# ---------------------------------------------------------------------------------------------------------------
# Backward kernels.


@autotune(_BC_CONFIGS, key=["N", "INIT", "NEW", "C_OUT", "CELLS_H", "CELLS_W", "CH"], interpreted=_INTERPRETED_BC)
@triton.jit
def _write_grad_kernel(grad_out, y1, cheap_w, pw, pb, pm, pv, peps, cw, cb, cm, cv, ceps, features,
                       z2, gw, gb, gm, gv, geps, children, lam_r, lam_c,
                       dpre2, y2, grad_features, gate_grad, part, T_MAX, ROW_G,
                       N, H, W, CELLS_H, CELLS_W, INIT, NEW, M, C_OUT,
                       DW: tl.constexpr, RELU: tl.constexpr, GHOST: tl.constexpr, HAS_GATE: tl.constexpr,
                       BILINEAR: tl.constexpr, TRAINING: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                       TB: tl.constexpr, CH: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr):
    """Partial rows: sum(dpre2) [new], sum(dpre2 * y2_hat) [new]; from ROW_G, the last DFC BN's sums [2 C]."""
    t = tl.program_id(1)
    n_cell, cell, cell_ok, n, i, j, ok = _cell_tile(t, N, CELLS_H * CELLS_W, W, children, CH, BQ)
    pid = tl.program_id(0)
    if GHOST and not HAS_GATE:  # without a gate the primary channels have nothing to do here
        pid += tl.cdiv(INIT, BC)
    cheap, rows, rows_ok, out_rows, out_ok = _channel_block(pid, INIT, NEW, C_OUT, GHOST, BC)
    c, c_ok, out_c = rows[:, None], rows_ok[:, None], out_rows[:, None]
    pixel = i * W + j
    zero = tl.zeros((BC, BQ * CH), ACC)
    grad = tl.load(grad_out + offset(n, out_c, pixel, C_OUT, H * W, CL), mask=out_ok[:, None] & ok,
                   other=0.0).to(ACC)
    if GHOST:
        y, pre, mu, rstd = _ghost_values(cheap, y1, cheap_w, n, c, c_ok, i, j, ok, H, W, INIT, M, pw, pb, pm, pv,
                                         peps, cw, cb, cm, cv, ceps, zero, DW, RELU, CL, TB)
        o = relu(pre, RELU)
    else:
        o = zero + tl.load(features + offset(n, c, pixel, C_OUT, H * W, CL), mask=c_ok & ok, other=0.0).to(ACC)
    grad_o = grad
    if HAS_GATE:
        g_scale, g_shift, g_mu, g_rstd = bn_params(gw, gb, gm, gv, geps, out_c, out_ok[:, None], ACC)
        lr = tl.load(lam_r + i, mask=ok, other=0.0) if BILINEAR else 0.0
        lc = tl.load(lam_c + j, mask=ok, other=0.0) if BILINEAR else 0.0
        cell_mask = out_ok[:, None] & cell_ok
        z, g, gate = _cell_gate(z2, n_cell, out_c, cell, C_OUT, CELLS_H, CELLS_W, cell_mask, g_scale, g_shift, lr,
                                lc, BQ, CH, BILINEAR, CL)
        grad_o = grad * gate
    if GHOST:
        if cheap:
            grad_pre = relu_grad(grad_o, pre, RELU)
            mask = c_ok & ok
            tl.store(dpre2 + offset(n, c, pixel, NEW, H * W, CL), grad_pre, mask=mask)
            if TRAINING:
                tl.store(y2 + offset(n, c, pixel, NEW, H * W, CL), y, mask=mask)
            store_sums(part, T_MAX, rows, rows_ok, t, grad_pre, mask)
            store_sums(part, T_MAX, NEW + rows, rows_ok, t, grad_pre * (y - mu) * rstd, mask)
    else:
        tl.store(grad_features + offset(n, c, pixel, C_OUT, H * W, CL), grad_o, mask=c_ok & ok)
    if HAS_GATE:
        grad_gate = tl.where(ok, grad * o, 0.0)
        if BILINEAR:  # each weight's share, gathered by the cell it belongs to in _gate_grad_kernel
            plane = N * C_OUT * CELLS_H * CELLS_W
            at = gate_grad + offset(n_cell, out_c, cell, C_OUT, CELLS_H * CELLS_W, CL)
            tl.store(at, _sum_children(grad_gate * (1.0 - lr) * (1.0 - lc), BQ, CH), mask=cell_mask)
            tl.store(at + plane, _sum_children(grad_gate * lr * (1.0 - lc), BQ, CH), mask=cell_mask)
            tl.store(at + 2 * plane, _sum_children(grad_gate * (1.0 - lr) * lc, BQ, CH), mask=cell_mask)
            tl.store(at + 3 * plane, _sum_children(grad_gate * lr * lc, BQ, CH), mask=cell_mask)
        else:
            _gate_pre_grad(_sum_children(grad_gate, BQ, CH), z, g, n_cell, out_rows, cell, cell_mask, C_OUT,
                           CELLS_H, CELLS_W, g_mu, g_rstd, gate_grad, part, T_MAX, ROW_G, t, CL)


@autotune(_BC_CONFIGS, key=["N", "C", "h", "w"], interpreted=_INTERPRETED_BC)
@triton.jit
def _gate_grad_kernel(gate_parts, z2, gw, gb, gm, gv, geps, dz2n, part, T_MAX, ROW_G, N, C, h, w,
                      CL: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr):
    t = tl.program_id(1)
    n, r, s, ok = _pixel_tile(t, N, h, w, BQ)
    rows = tl.program_id(0) * BC + tl.arange(0, BC)
    c = rows[:, None]
    mask = (c < C) & ok
    at = offset(n, c, r * w + s, C, h * w, CL)
    plane = N * C * h * w
    up = w * (C if CL else 1)
    left = C if CL else 1
    grad = tl.load(gate_parts + at, mask=mask, other=0.0)
    grad += tl.load(gate_parts + plane + at - up, mask=mask & (r > 0), other=0.0)
    grad += tl.load(gate_parts + 2 * plane + at - left, mask=mask & (s > 0), other=0.0)
    grad += tl.load(gate_parts + 3 * plane + at - up - left, mask=mask & (r > 0) & (s > 0), other=0.0)
    scale, shift, mu, rstd = bn_params(gw, gb, gm, gv, geps, c, c < C, ACC)
    z = tl.load(z2 + at, mask=mask, other=0.0).to(ACC)
    _gate_pre_grad(grad, z, tl.sigmoid(scale * z + shift), n, rows, r * w + s, mask, C, h, w, mu, rstd, dz2n, part,
                   T_MAX, ROW_G, t, CL)


@autotune(_BC_CONFIGS, key=["N", "C", "h", "w", "K"], interpreted=_INTERPRETED_BC)
@triton.jit
def _dfc_conv_grad_kernel(dzn_out, z_out, ow, ob, om, ov, oeps, out_gb, out_gw, z_in, weight, iw, ib, im, iv, ieps,
                          dzn_in, part, T_MAX, ROW, N, C, h, w, K: tl.constexpr, VERTICAL: tl.constexpr,
                          TRAINING: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, TB: tl.constexpr,
                          BQ: tl.constexpr, BC: tl.constexpr):
    """Partial rows from ROW: sum(dzn_in) [C], sum(dzn_in * z_in_hat) [C], the conv weight gradient [C * K]."""
    t = tl.program_id(1)
    n, r, s, ok = _pixel_tile(t, N, h, w, BQ)
    rows = tl.program_id(0) * BC + tl.arange(0, BC)
    c = rows[:, None]
    c_ok = c < C
    mask = c_ok & ok
    o_scale, _, o_mu, o_rstd = bn_params(ow, ob, om, ov, oeps, c, c_ok, ACC)
    a, b, k0 = bn_grad_terms(out_gb, out_gw, c, c_ok, N * h * w, o_scale, o_mu, o_rstd, TRAINING)
    i_scale, i_shift, i_mu, i_rstd = bn_params(iw, ib, im, iv, ieps, c, c_ok, ACC)
    at = offset(n, c, r * w + s, C, h * w, CL)
    grad_here = a * tl.load(dzn_out + at, mask=mask, other=0.0).to(ACC)
    if TRAINING:
        grad_here += b * tl.load(z_out + at, mask=mask, other=0.0).to(ACC) + k0
    length, step = _axis_step(h, w, C, VERTICAL, CL)
    pos = (r if VERTICAL else s)[:, :, None]
    at3, mask3 = at[:, :, None], mask[:, :, None]
    acc = tl.zeros((BC, BQ), ACC)
    for t0 in tl.static_range(0, K, TB):
        k = t0 + tl.arange(0, TB)
        d = k - K // 2
        # transposed conv: the output at p - d read this pixel through tap k
        src_ok = mask3 & (k < K) & (pos - d >= 0) & (pos - d < length)
        grad_src = a[:, :, None] * tl.load(dzn_out + at3 - d * step, mask=src_ok, other=0.0).to(ACC)
        if TRAINING:
            grad_src += (b[:, :, None] * tl.load(z_out + at3 - d * step, mask=src_ok, other=0.0).to(ACC)
                         + k0[:, :, None])
        wt = tl.load(weight + c[:, :, None] * K + k, mask=c_ok[:, :, None] & (k < K), other=0.0).to(ACC)
        acc += tl.sum(wt * tl.where(src_ok, grad_src, 0.0), axis=2)
        # weight gradient: the output gradient here times the (normalised, zero-padded) input at p + d
        dst_ok = mask3 & (k < K) & (pos + d >= 0) & (pos + d < length)
        z_dst = tl.load(z_in + at3 + d * step, mask=dst_ok, other=0.0).to(ACC)
        store_sums(part, T_MAX, ROW + 2 * C + rows[:, None] * K + k[None, :], (rows < C)[:, None] & (k < K)[None, :],
                   t, grad_here[:, :, None] * (i_scale[:, :, None] * z_dst + i_shift[:, :, None]), dst_ok)
    tl.store(dzn_in + at, acc, mask=mask)
    z_hat = (tl.load(z_in + at, mask=mask, other=0.0).to(ACC) - i_mu) * i_rstd
    store_sums(part, T_MAX, ROW + rows, rows < C, t, acc, mask)
    store_sums(part, T_MAX, ROW + C + rows, rows < C, t, acc * z_hat, mask)


@autotune(_BC_CONFIGS, key=["N", "INIT", "NEW", "C_OUT", "H", "W", "DW"], interpreted=_INTERPRETED_BC)
@triton.jit
def _cheap_grad_kernel(grad_out, y1, cheap_w, pw, pb, pm, pv, peps, cw, cb, cm, cv, ceps, cheap_gb, cheap_gw, dpre2,
                       y2, z2, gw, gb, gm, gv, geps, owner_r, owner_c, lam_r, lam_c, dpre1, part, T_MAX,
                       N, H, W, h, w, INIT, NEW, M, C_OUT,
                       DW: tl.constexpr, RELU: tl.constexpr, HAS_GATE: tl.constexpr, BILINEAR: tl.constexpr,
                       TRAINING: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, TB: tl.constexpr,
                       BP: tl.constexpr, BC: tl.constexpr):
    """Partial rows: sum(dpre1) [init], sum(dpre1 * y1_hat) [init], the cheap weight gradient [new * DW * DW]."""
    t = tl.program_id(1)
    n, i, j, ok = _pixel_tile(t, N, H, W, BP)
    rows = tl.program_id(0) * BC + tl.arange(0, BC)
    c = rows[:, None]
    c_ok = c < INIT
    mask = c_ok & ok
    pixel = i * W + j
    p_scale, p_shift, p_mu, p_rstd = bn_params(pw, pb, pm, pv, peps, c, c_ok, ACC)
    y1_at = y1 + offset(n, c, pixel, INIT, H * W, CL)
    y = tl.load(y1_at, mask=mask, other=0.0).to(ACC)
    pre = p_scale * y + p_shift
    grad_x1 = tl.load(grad_out + offset(n, c, pixel, C_OUT, H * W, CL), mask=mask, other=0.0).to(ACC)
    if HAS_GATE:
        g_scale, g_shift, _, _ = bn_params(gw, gb, gm, gv, geps, c, c_ok, ACC)
        cell = tl.load(owner_r + i, mask=ok, other=0) * w + tl.load(owner_c + j, mask=ok, other=0)
        # (no "_" here: the loop below rebinds "_", and a compiled loop would take it as loop-carried)
        z_cell, g, g10, g01, g11 = _gate_corners(z2, n, c, cell, C_OUT, h, w, mask, g_scale, g_shift, BILINEAR, CL)
        if BILINEAR:
            g = _mix(g, g10, g01, g11, tl.load(lam_r + i, mask=ok, other=0.0), tl.load(lam_c + j, mask=ok, other=0.0))
        grad_x1 *= g
    i3, j3, mask3 = i[:, :, None], j[:, :, None], mask[:, :, None]
    dpre2_at = dpre2 + offset(n, c * M, pixel, NEW, H * W, CL)
    y2_at = y2 + offset(n, c * M, pixel, NEW, H * W, CL)
    step = NEW if CL else 1
    y1_step = INIT if CL else 1
    channel = 1 if CL else H * W
    for k in range(M):  # the cheap channels c * M + k read primary channel c
        cheap_c = c * M + k
        c_scale, _, c_mu, c_rstd = bn_params(cw, cb, cm, cv, ceps, cheap_c, c_ok, ACC)
        a, b, k0 = bn_grad_terms(cheap_gb, cheap_gw, cheap_c, c_ok, N * H * W, c_scale, c_mu, c_rstd, TRAINING)
        grad_here = a * tl.load(dpre2_at + k * channel, mask=mask, other=0.0).to(ACC)
        if TRAINING:
            grad_here += b * tl.load(y2_at + k * channel, mask=mask, other=0.0).to(ACC) + k0
        a, b, k0, grad_here = a[:, :, None], b[:, :, None], k0[:, :, None], grad_here[:, :, None]
        for t0 in tl.static_range(0, DW * DW, TB):
            d = t0 + tl.arange(0, TB)
            di = d // DW - DW // 2
            dj = d % DW - DW // 2
            # transposed conv: the cheap output at p - (di, dj) read this pixel through tap d
            src_ok = mask3 & (d < DW * DW) & (i3 - di >= 0) & (i3 - di < H) & (j3 - dj >= 0) & (j3 - dj < W)
            shift = k * channel - (di * W + dj) * step
            grad_src = a * tl.load(dpre2_at[:, :, None] + shift, mask=src_ok, other=0.0).to(ACC)
            if TRAINING:
                grad_src += b * tl.load(y2_at[:, :, None] + shift, mask=src_ok, other=0.0).to(ACC) + k0
            wt = tl.load(cheap_w + (cheap_c * (DW * DW))[:, :, None] + d, mask=c_ok[:, :, None] & (d < DW * DW),
                         other=0.0).to(ACC)
            grad_x1 += tl.sum(wt * tl.where(src_ok, grad_src, 0.0), axis=2)
            # weight gradient: the cheap output gradient here times the activation at p + (di, dj)
            dst_ok = mask3 & (d < DW * DW) & (i3 + di >= 0) & (i3 + di < H) & (j3 + dj >= 0) & (j3 + dj < W)
            v = tl.load(y1_at[:, :, None] + (di * W + dj) * y1_step, mask=dst_ok, other=0.0).to(ACC)
            x1 = relu(p_scale[:, :, None] * v + p_shift[:, :, None], RELU)
            store_sums(part, T_MAX, 2 * INIT + (rows[:, None] * M + k) * (DW * DW) + d[None, :],
                       (rows < INIT)[:, None] & (d < DW * DW)[None, :], t, grad_here * x1, dst_ok)
    grad_pre = relu_grad(grad_x1, pre, RELU)
    tl.store(dpre1 + offset(n, c, pixel, INIT, H * W, CL), grad_pre, mask=mask)
    store_sums(part, T_MAX, rows, rows < INIT, t, grad_pre, mask)
    store_sums(part, T_MAX, INIT + rows, rows < INIT, t, grad_pre * (y - p_mu) * p_rstd, mask)


@autotune([triton.Config({"BK": bk, "BC": bc}, num_warps=nw) for bk in (32, 64) for bc in (16, 32) for nw in (4, 8)],
          key=["N", "CIN", "INIT", "C_DFC", "H", "W"], interpreted=triton.Config({"BK": 32, "BC": 64}))
@triton.jit
def _project_grad_kernel(dpre1, y1, primary_w, pw, pb, pm, pv, peps, p_gb, p_gw, dz0n, z0, dfc_w, zw, zb, zm, zv,
                         zeps, z_gb, z_gw, dx, N, CIN, H, W, INIT, C_DFC, TRAINING: tl.constexpr, CL: tl.constexpr,
                         ACC: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    t = tl.program_id(1)
    n, p, px_ok, n_q, p_q, pool_ok = _quad_tile(t, N, H, W, BQ)
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    acc = tl.zeros((BK, 4 * BQ), ACC)
    for c0 in range(0, INIT, BC):
        c = c0 + tl.arange(0, BC)
        grad = _bn_input_grad(dpre1, y1, n[None, :], c[:, None], (c < INIT)[:, None], p[None, :], px_ok[None, :],
                              INIT, H * W, pw, pb, pm, pv, peps, p_gb, p_gw, N * H * W, TRAINING, CL, ACC)
        wt = tl.load(primary_w + c[None, :] * CIN + k[:, None], mask=(c < INIT)[None, :] & (k < CIN)[:, None],
                     other=0.0)
        acc += mm(wt, grad.to(wt.dtype))
    acc_z = tl.zeros((BK, BQ), ACC)
    for c0 in range(0, C_DFC, BC):
        c = c0 + tl.arange(0, BC)
        grad = _bn_input_grad(dz0n, z0, n_q[None, :], c[:, None], (c < C_DFC)[:, None], p_q[None, :],
                              pool_ok[None, :], C_DFC, (H // 2) * (W // 2), zw, zb, zm, zv, zeps, z_gb, z_gw,
                              N * (H // 2) * (W // 2), TRAINING, CL, ACC)
        wt = tl.load(dfc_w + c[None, :] * CIN + k[:, None], mask=(c < C_DFC)[None, :] & (k < CIN)[:, None],
                     other=0.0)
        acc_z += mm(wt, grad.to(wt.dtype))
    result = tl.reshape(tl.reshape(acc, (BK, BQ, 4)) + 0.25 * acc_z[:, :, None], (BK, 4 * BQ))
    tl.store(dx + offset(n[None, :], k[:, None], p[None, :], CIN, H * W, CL), result,
             mask=(k < CIN)[:, None] & px_ok[None, :])


@autotune([triton.Config({"BC": bc, "BK": bk}, num_warps=nw) for bc in (32, 64) for bk in (32, 64) for nw in (4, 8)],
          key=["N", "CIN", "INIT", "C_DFC", "H", "W"], interpreted=triton.Config({"BC": 32, "BK": 32}))
@triton.jit
def _project_weight_grad_kernel(x, dpre1, y1, pw, pb, pm, pv, peps, p_gb, p_gw, dz0n, z0, zw, zb, zm, zv, zeps,
                                z_gb, z_gw, part, SPLIT, N, CIN, H, W, INIT, C_DFC, TRAINING: tl.constexpr,
                                CL: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr, BC: tl.constexpr,
                                BK: tl.constexpr):
    """Split-K partials of the [primary_w; conv_w] gradients: row c * CIN + k, column = this program's split."""
    primary_blocks = tl.cdiv(INIT, BC)
    is_primary = tl.program_id(0) < primary_blocks
    c = tl.where(is_primary, tl.program_id(0), tl.program_id(0) - primary_blocks) * BC + tl.arange(0, BC)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    split = tl.program_id(2)
    acc = tl.zeros((BC, BK), ACC)
    for t in range(split, tl.cdiv(N * ((H + 1) // 2) * ((W + 1) // 2), BQ), SPLIT):
        n, p, px_ok, n_q, p_q, pool_ok = _quad_tile(t, N, H, W, BQ)
        xt = tl.load(x + offset(n[:, None], k[None, :], p[:, None], CIN, H * W, CL),
                     mask=px_ok[:, None] & (k < CIN)[None, :], other=0.0)
        if is_primary:
            grad = _bn_input_grad(dpre1, y1, n[None, :], c[:, None], (c < INIT)[:, None], p[None, :],
                                  px_ok[None, :], INIT, H * W, pw, pb, pm, pv, peps, p_gb, p_gw, N * H * W, TRAINING,
                                  CL, ACC)
            acc += mm(grad.to(xt.dtype), xt)
        else:
            # (names differ from the other branch's: a compiled if / else must give common names one type)
            pooled = tl.sum(tl.reshape(tl.trans(xt).to(ACC), (BK, BQ, 4)), axis=2) * 0.25
            grad_z = _bn_input_grad(dz0n, z0, n_q[None, :], c[:, None], (c < C_DFC)[:, None], p_q[None, :],
                                    pool_ok[None, :], C_DFC, (H // 2) * (W // 2), zw, zb, zm, zv, zeps, z_gb, z_gw,
                                    N * (H // 2) * (W // 2), TRAINING, CL, ACC)
            acc += mm(grad_z.to(xt.dtype), tl.trans(pooled.to(xt.dtype)))
    rows = (tl.where(is_primary, 0, INIT) + c)[:, None] * CIN + k[None, :]
    tl.store(part + rows.to(tl.int64) * SPLIT + split, acc,
             mask=(c < tl.where(is_primary, INIT, C_DFC))[:, None] & (k < CIN)[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Host side.


class _Sizes:
    """Sizes, flags and tile counts of one call."""

    def __init__(self, x: torch.Tensor, ghost: Ghost | None, dfc: Dfc | None, c_out: int):
        self.n, self.cin, self.H, self.W = x.shape
        self.h, self.w = self.H // 2, self.W // 2
        self.fmt = memory_format_of(x)
        self.cl = self.fmt == torch.channels_last
        self.acc = tl_acc(x.dtype)
        self.c_out = c_out
        self.init = ghost.primary_weight.shape[0] if ghost else 0
        self.new = ghost.cheap_weight.shape[0] if ghost else 0
        self.m = self.new // self.init if ghost else 1
        self.dw = ghost.cheap_weight.shape[-1] if ghost else 1
        self.relu = bool(ghost.relu) if ghost else False
        self.c = dfc.conv_weight.shape[0] if dfc else 0
        self.k = dfc.horizontal_weight.shape[-1] if dfc else 1
        self.dfc_offset = self.init + self.new  # where the DFC BatchNorms start in the packed statistics
        self.stats = self.dfc_offset + 3 * self.c
        quads = self.n * ((self.H + 1) // 2) * ((self.W + 1) // 2)
        self.quad_block = pixel_block(quads, 16)  # at least 16: the pooled operand of tl.dot
        self.quad_tiles = triton.cdiv(quads, self.quad_block)
        self.pixel_block = pixel_block(self.n * self.H * self.W, 32)
        self.pixel_tiles = triton.cdiv(self.n * self.H * self.W, self.pixel_block)
        self.quarter_block = pixel_block(self.n * self.h * self.w, 64)
        self.quarter_tiles = triton.cdiv(self.n * self.h * self.w, self.quarter_block)


class _Cells:
    """The cells of the output kernels (gate pixels, or single pixels without a gate): tables and tiling."""

    def __init__(self, x: torch.Tensor, sz: _Sizes, dfc: Dfc | None):
        self.h, self.w = (sz.h, sz.w) if dfc else (sz.H, sz.W)
        self.tables = upsampling(sz.H, sz.W, self.h, self.w, dfc.upsample if dfc else "identity", x.dtype, x.device)
        self.ch = self.tables.ch
        cells = sz.n * self.h * self.w
        self.block = max(pixel_block(cells * self.ch, 64) // self.ch, 1)
        self.tiles = triton.cdiv(cells, self.block)


def _bn(bn: BatchNormArgs | None, x: torch.Tensor):
    """A BatchNorm's kernel arguments (placeholders when absent)."""
    return (bn.weight, bn.bias, bn.mean, bn.var, float(bn.eps)) if bn else (x, x, x, x, 0.0)


def _project(x, sz, ghost, dfc, training, moments: Partials | None):
    """y1 = primary_w @ x and z0 = conv_w @ avg_pool(x) (either may be None), moments of both in training."""
    y1 = scratch((sz.n, sz.init, sz.H, sz.W), x, sz.cl) if ghost else x
    z0 = scratch((sz.n, sz.c, sz.h, sz.w), x, sz.cl) if dfc else x
    part = moments.buffer if moments else x
    _project_kernel[lambda meta: (triton.cdiv(max(sz.init, sz.c), meta["BC"]), sz.quad_tiles)](
        x, ghost.primary_weight.contiguous() if ghost else x, dfc.conv_weight.contiguous() if dfc else x, y1, z0,
        part, moments.rows if moments else 0, moments.t_max if moments else 0, sz.n, sz.cin, sz.H, sz.W, sz.init,
        sz.c, TRAINING=training, CL=sz.cl, ACC=sz.acc, BQ=sz.quad_block, BK=reduction_block(sz.cin))
    return y1, z0


def _cheap_moments(y1, sz, ghost, moments: Partials):
    """Moments of y2 = depthwise(act(bn(y1))) into partial rows [0, new)."""
    _cheap_moments_kernel[lambda meta: (triton.cdiv(sz.new, meta["BC"]), sz.pixel_tiles)](
        y1, ghost.cheap_weight.contiguous(), *_bn(ghost.primary_bn, y1), moments.buffer, moments.rows,
        moments.t_max, sz.n, sz.H, sz.W, sz.init, sz.new, sz.m, DW=sz.dw, RELU=sz.relu, CL=sz.cl, ACC=sz.acc,
        TB=tap_block(sz.dw * sz.dw), BP=sz.pixel_block)


def _dfc_conv(z_in, weight, bn_in, sz, vertical, training, moments: Partials | None, row: int):
    """The (1, K) or (K, 1) depthwise conv of bn_in(z_in), moments into partial rows from ``row`` in training."""
    z_out = scratch(z_in.shape, z_in, sz.cl)
    _dfc_conv_kernel[lambda meta: (triton.cdiv(sz.c, meta["BC"]), sz.quarter_tiles)](
        z_in, weight.contiguous(), *_bn(bn_in, z_in), z_out, moments.buffer if moments else z_in,
        moments.rows if moments else 0, moments.t_max if moments else 0, row, sz.n, sz.c, sz.h, sz.w, K=sz.k,
        VERTICAL=vertical, TRAINING=training, CL=sz.cl, ACC=sz.acc, TB=tap_block(sz.k),
        BQ=sz.quarter_block)
    return z_out


def _ghost_args(x, ghost: Ghost | None, y1):
    if ghost is None:
        return (x, x, *_bn(None, x), *_bn(None, x))
    return (y1, ghost.cheap_weight.contiguous(), *_bn(ghost.primary_bn, x), *_bn(ghost.cheap_bn, x))


def _stage_batch_norms(sz: _Sizes, ghost: Ghost | None, dfc: Dfc | None) -> list[list[tuple[int, int, int]]]:
    """``(start in the packed statistics, channels, values per channel)`` of the BatchNorms whose statistics each
    forward stage completes: primary and DFC 0, then cheap and DFC 1, then DFC 2."""
    full, quarter = sz.n * sz.H * sz.W, sz.n * sz.h * sz.w
    ghost_bns = [(0, sz.init, full), (sz.init, sz.new, full)] if ghost else [None, None]
    dfc_bns = [(sz.dfc_offset + i * sz.c, sz.c, quarter) for i in range(3)] if dfc else [None] * 3
    stage_bns = [[ghost_bns[0], dfc_bns[0]], [ghost_bns[1], dfc_bns[1]], [dfc_bns[2]]]
    return [[bn for bn in stage if bn is not None] for stage in stage_bns]


def _sync_statistics(stats_mean, stats_var, bns, sync_group: str | None) -> None:
    """The batch statistics of ``bns`` (see :func:`_stage_batch_norms`) become the process group's, in place."""
    if sync_group is None:
        return
    for start, size, count in bns:
        mean, var = distributed.group_moments(stats_mean[start:start + size], stats_var[start:start + size],
                                              count, sync_group)
        stats_mean[start:start + size] = mean
        stats_var[start:start + size] = var


def forward(x: torch.Tensor, ghost: Ghost | None, dfc: Dfc | None, features: torch.Tensor | None,
            training: bool, sync_group: str | None):
    """The fused forward: ``(out, stats_mean, stats_var)`` as the backend contract defines them.

    ``ghost`` and / or ``dfc`` (with ``features`` [N, C, H, W] when there is no Ghost part). In training the
    BatchNorm mean / var fields are ignored (batch statistics are computed, the whole process group's when
    ``sync_group`` names one); in eval they are the running ones.
    """
    c_out = ghost.oup if ghost else features.shape[1]
    sz = _Sizes(x, ghost, dfc, c_out)
    x = x.contiguous(memory_format=sz.fmt)
    acc = acc_dtype(x.dtype)
    bns = ([ghost.primary_bn, ghost.cheap_bn] if ghost else []) + (list(dfc.bns) if dfc else [])
    out = backends.empty((sz.n, c_out, sz.H, sz.W), like=x, memory_format=sz.fmt)
    if not training:
        stats_mean = torch.cat([bn.mean.detach().to(acc) for bn in bns])
        stats_var = torch.cat([bn.var.detach().to(acc) for bn in bns])
    elif sz.n == 0:  # an empty batch has no statistics of its own; the group's, if it has one
        stats_mean, stats_var = x.new_zeros(sz.stats, dtype=acc), x.new_ones(sz.stats, dtype=acc)
        for stage in _stage_batch_norms(sz, ghost, dfc):
            _sync_statistics(stats_mean, stats_var, stage, sync_group)
    else:
        stats_mean = backends.empty((sz.stats,), like=x, dtype=acc)
        stats_var = backends.empty((sz.stats,), like=x, dtype=acc)
        sizes = [bn.weight.shape[0] for bn in bns]
        bns = [bn._replace(mean=m, var=v) for bn, m, v in zip(bns, stats_mean.split(sizes), stats_var.split(sizes))]
    if sz.n == 0:
        return out, stats_mean, stats_var
    if ghost:
        ghost = ghost._replace(primary_bn=bns[0], cheap_bn=bns[1])
    if dfc:
        dfc = dfc._replace(bns=tuple(bns[-3:]))

    stage_bns = _stage_batch_norms(sz, ghost, dfc)
    # stage 1: y1 and z0 (BN statistics: primary at 0, the first DFC BN after the Ghost ones)
    moments = Partials(x, sz.init, sz.quad_tiles, sz.c, sz.quad_tiles, moments=True) if training else None
    y1, z0 = _project(x, sz, ghost, dfc, training, moments)
    if training:
        moments.finalize_moments(stats_mean, stats_var, 0, sz.new)
        _sync_statistics(stats_mean, stats_var, stage_bns[0], sync_group)
    # stage 2: statistics of y2 (not stored), z1 (statistics: cheap at init, the second DFC BN)
    moments = (Partials(x, sz.new, sz.pixel_tiles if ghost else 0, sz.c, sz.quarter_tiles, moments=True)
               if training else None)
    if training and ghost:
        _cheap_moments(y1, sz, ghost, moments)
    z1 = _dfc_conv(z0, dfc.horizontal_weight, dfc.bns[0], sz, False, training, moments, sz.new) if dfc else None
    if training:
        moments.finalize_moments(stats_mean, stats_var, sz.init, sz.c)
        _sync_statistics(stats_mean, stats_var, stage_bns[1], sync_group)
    # stage 3: z2 (statistics: the last DFC BN)
    if dfc:
        moments = Partials(x, sz.c, sz.quarter_tiles, moments=True) if training else None
        z2 = _dfc_conv(z1, dfc.vertical_weight, dfc.bns[1], sz, True, training, moments, 0)
        if training:
            moments.finalize_moments(stats_mean, stats_var, sz.dfc_offset + 2 * sz.c, 0)
            _sync_statistics(stats_mean, stats_var, stage_bns[2], sync_group)

    cells = _Cells(x, sz, dfc)
    _write_kernel[lambda meta: ((triton.cdiv(sz.init, meta["BC"]) if ghost else 0)
                                + triton.cdiv(c_out - sz.init, meta["BC"]), cells.tiles)](
        out, *_ghost_args(x, ghost, y1), features.contiguous(memory_format=sz.fmt) if features is not None else x,
        z2 if dfc else x, *_bn(dfc.bns[2] if dfc else None, x), cells.tables.children,
        cells.tables.lam_r, cells.tables.lam_c, sz.n, sz.H, sz.W, cells.h, cells.w, sz.init, sz.m, c_out, DW=sz.dw,
        RELU=sz.relu, GHOST=ghost is not None, HAS_GATE=dfc is not None,
        BILINEAR=dfc is not None and dfc.upsample == "bilinear",
        CL=sz.cl, ACC=sz.acc, TB=tap_block(sz.dw * sz.dw), CH=cells.ch, BQ=cells.block)
    return out, stats_mean, stats_var


class Gradients(NamedTuple):
    """Gradients of one call: x, features, the convolution weights (None where absent), BN weight / bias packed."""

    x: torch.Tensor
    features: torch.Tensor | None
    primary_weight: torch.Tensor | None
    cheap_weight: torch.Tensor | None
    conv_weight: torch.Tensor | None
    horizontal_weight: torch.Tensor | None
    vertical_weight: torch.Tensor | None
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _weight_grad_split(x: torch.Tensor, sz: _Sizes) -> int:
    """Programs along the pixels of the weight-gradient GEMM: about two waves of the GPU, at most one per tile."""
    if INTERPRETED:
        return 1
    blocks = triton.cdiv(sz.init + sz.c, 32) * triton.cdiv(sz.cin, 32)
    return max(1, min(sz.quad_tiles, 2 * _multiprocessors(x.device) // blocks))


class _GroupGradSums:
    """The BatchNorm gradient sums of a training backward whose BatchNorms synchronise over a process group.

    The kernels read each BatchNorm's sums (``sum(g)``, ``sum(g * y_hat)``) from the returned gradient tensors and
    divide them by the local count: :meth:`reduce` replaces them there by the group's sums times local / group
    count (so the kernels take the group's means), and :meth:`restore` puts this process's sums back as the weight
    and bias gradients (``nn.SyncBatchNorm``'s are local too). Reductions happen in the same order on every process,
    BatchNorms in stage order: cheap and DFC 2, then primary and DFC 1, then DFC 0.
    """

    STAGES = ((1, 4), (0, 3), (2,))

    def __init__(self, sz: _Sizes, sync_group: str | None, training: bool):
        self.group = sync_group if training else None
        full, quarter = sz.n * sz.H * sz.W, sz.n * sz.h * sz.w
        self.counts = (full, full, quarter, quarter, quarter)
        self.local = []

    def reduce(self, stage: int, bn_grads) -> None:
        """Reduce the sums of the BatchNorms of backward ``stage``; bn_grads(index) -> (sum g, sum g * y_hat)."""
        if self.group is None:
            return
        for index in self.STAGES[stage]:
            bias, weight = bn_grads(index)
            self.local.append((bias, weight, bias.clone(), weight.clone()))
            sums, group_count = distributed.group_grad_sums(torch.stack([bias, weight]), self.counts[index],
                                                             self.group)
            if self.counts[index] > 0:
                bias.copy_(sums[0] * (self.counts[index] / group_count))
                weight.copy_(sums[1] * (self.counts[index] / group_count))

    def restore(self) -> None:
        for bias, weight, local_bias, local_weight in self.local:
            bias.copy_(local_bias)
            weight.copy_(local_weight)


def backward(grad_out: torch.Tensor, x: torch.Tensor, ghost: Ghost | None, dfc: Dfc | None,
             features: torch.Tensor | None, training: bool, sync_group: str | None) -> Gradients:
    """The fused backward; the BatchNorm mean / var fields hold the statistics the forward normalised with.

    Sums over pixels (BatchNorm and depthwise / 1x1 weight gradients) are reduced from per-tile partials straight
    into the returned tensors; later stages read the BatchNorm sums from there (the process group's, see
    :class:`_GroupGradSums`, when ``sync_group`` names one in training).
    """
    c_out = ghost.oup if ghost else features.shape[1]
    sz = _Sizes(x, ghost, dfc, c_out)
    group_sums = _GroupGradSums(sz, sync_group, training)
    if sz.n == 0:
        grads = _empty_gradients(x, ghost, dfc, features, sz)
        for stage in range(len(group_sums.STAGES)):  # this process takes part in the group's reductions
            group_sums.reduce(stage, lambda index: _bn_slices(grads, sz, index))
        return grads
    x = x.contiguous(memory_format=sz.fmt)
    grad_out = grad_out.contiguous(memory_format=sz.fmt)
    if features is not None:
        features = features.contiguous(memory_format=sz.fmt)
    acc = acc_dtype(x.dtype)
    bilinear = dfc is not None and dfc.upsample == "bilinear"
    gate_bn = _bn(dfc.bns[2] if dfc else None, x)
    grads = _allocate_gradients(x, ghost, dfc, features, sz)

    def bn_grads(index):
        return _bn_slices(grads, sz, index)

    # recompute the forward's stored intermediates
    y1, z0 = _project(x, sz, ghost, dfc, False, None)
    if dfc:
        z1 = _dfc_conv(z0, dfc.horizontal_weight, dfc.bns[0], sz, False, False, None, 0)
        z2 = _dfc_conv(z1, dfc.vertical_weight, dfc.bns[1], sz, True, False, None, 0)

    # stage 1, per cell: the cheap BN's output gradient (stored) and sums; the gate gradient
    cells = _Cells(x, sz, dfc)
    partials = Partials(x, 2 * sz.new, cells.tiles, 2 * sz.c, sz.quarter_tiles if bilinear else cells.tiles)
    dpre2 = scratch((sz.n, sz.new, sz.H, sz.W), x, sz.cl) if ghost else x
    y2 = scratch((sz.n, sz.new, sz.H, sz.W), x, sz.cl) if ghost and training else x
    dz2n = scratch((sz.n, sz.c, sz.h, sz.w), x, sz.cl, acc) if dfc else x
    gate_parts = torch.empty(4 * sz.n * sz.c * sz.h * sz.w, dtype=acc, device=x.device) if bilinear else dz2n
    _write_grad_kernel[lambda meta: ((triton.cdiv(sz.init, meta["BC"]) if ghost and dfc else 0)
                                     + triton.cdiv(sz.new if ghost else c_out, meta["BC"]), cells.tiles)](
        grad_out, *_ghost_args(x, ghost, y1), features if features is not None else x, z2 if dfc else x, *gate_bn,
        cells.tables.children, cells.tables.lam_r, cells.tables.lam_c, dpre2, y2,
        grads.features if features is not None else x, gate_parts, partials.buffer, partials.t_max, 2 * sz.new, sz.n,
        sz.H, sz.W, cells.h, cells.w, sz.init, sz.new, sz.m, c_out, DW=sz.dw, RELU=sz.relu, GHOST=ghost is not None,
        HAS_GATE=dfc is not None, BILINEAR=bilinear, TRAINING=training, CL=sz.cl, ACC=sz.acc,
        TB=tap_block(sz.dw * sz.dw), CH=cells.ch, BQ=cells.block)
    if bilinear:
        _gate_grad_kernel[lambda meta: (triton.cdiv(sz.c, meta["BC"]), sz.quarter_tiles)](
            gate_parts, z2, *gate_bn, dz2n, partials.buffer, partials.t_max, 2 * sz.new, sz.n, sz.c, sz.h, sz.w,
            CL=sz.cl, ACC=sz.acc, BQ=sz.quarter_block)
    partials.sum_into(*bn_grads(1), *bn_grads(4))
    group_sums.reduce(0, bn_grads)

    # stage 2: into the primary branch (Ghost), through the vertical conv (DFC)
    ghost_rows = 2 * sz.init + sz.new * sz.dw * sz.dw
    partials = Partials(x, ghost_rows, sz.pixel_tiles, 2 * sz.c + sz.c * sz.k, sz.quarter_tiles)
    dpre1 = scratch((sz.n, sz.init, sz.H, sz.W), x, sz.cl) if ghost else x
    if ghost:
        _cheap_grad_kernel[lambda meta: (triton.cdiv(sz.init, meta["BC"]), sz.pixel_tiles)](
            grad_out, *_ghost_args(x, ghost, y1), *bn_grads(1), dpre2, y2, z2 if dfc else x, *gate_bn,
            cells.tables.owner_r, cells.tables.owner_c, cells.tables.lam_r, cells.tables.lam_c, dpre1, partials.buffer,
            partials.t_max, sz.n, sz.H, sz.W, cells.h, cells.w, sz.init, sz.new, sz.m, c_out, DW=sz.dw,
            RELU=sz.relu, HAS_GATE=dfc is not None, BILINEAR=bilinear, TRAINING=training, CL=sz.cl, ACC=sz.acc,
            TB=tap_block(sz.dw * sz.dw), BP=sz.pixel_block)
    if dfc:
        dz1n = scratch((sz.n, sz.c, sz.h, sz.w), x, sz.cl, acc)
        _dfc_conv_grad(dz2n, z2, dfc.bns[2], bn_grads(4), z1, dfc.vertical_weight, dfc.bns[1], dz1n, partials,
                       ghost_rows, sz, True, training)
    partials.sum_into(*bn_grads(0), grads.cheap_weight, *bn_grads(3), grads.vertical_weight)
    group_sums.reduce(1, bn_grads)

    # stage 3: through the horizontal conv (DFC)
    if dfc:
        partials = Partials(x, 2 * sz.c + sz.c * sz.k, sz.quarter_tiles)
        dz0n = scratch((sz.n, sz.c, sz.h, sz.w), x, sz.cl, acc)
        _dfc_conv_grad(dz1n, z1, dfc.bns[1], bn_grads(3), z0, dfc.horizontal_weight, dfc.bns[0], dz0n, partials, 0,
                       sz, False, training)
        partials.sum_into(*bn_grads(2), grads.horizontal_weight)
    group_sums.reduce(2, bn_grads)

    # stage 4: through the 1x1 convolutions (and the pooling) into x and the weights
    primary_grad = (dpre1, y1, *_bn(ghost.primary_bn, x), *bn_grads(0)) if ghost else (x, x, *_bn(None, x), x, x)
    dfc_grad = (dz0n, z0, *_bn(dfc.bns[0], x), *bn_grads(2)) if dfc else (x, x, *_bn(None, x), x, x)
    _project_grad_kernel[lambda meta: (triton.cdiv(sz.cin, meta["BK"]), sz.quad_tiles)](
        *primary_grad[:2], ghost.primary_weight.contiguous() if ghost else x, *primary_grad[2:], *dfc_grad[:2],
        dfc.conv_weight.contiguous() if dfc else x, *dfc_grad[2:], grads.x, sz.n, sz.cin, sz.H, sz.W, sz.init, sz.c,
        TRAINING=training, CL=sz.cl, ACC=sz.acc, BQ=sz.quad_block)
    split = _weight_grad_split(x, sz)
    partials = Partials(x, (sz.init + sz.c) * sz.cin, split)
    _project_weight_grad_kernel[lambda meta: (triton.cdiv(sz.init, meta["BC"]) + triton.cdiv(sz.c, meta["BC"]),
                                              triton.cdiv(sz.cin, meta["BK"]), split)](
        x, *primary_grad, *dfc_grad, partials.buffer, split, sz.n, sz.cin, sz.H, sz.W, sz.init, sz.c,
        TRAINING=training, CL=sz.cl, ACC=sz.acc, BQ=sz.quad_block)
    partials.sum_into(grads.primary_weight, grads.conv_weight)
    group_sums.restore()
    return _present(grads, ghost, dfc, features)


def _bn_slices(grads: Gradients, sz: _Sizes, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm ``index``'s (in op order) sum(grad) and sum(grad * y_hat): its bias and weight gradients."""
    start = (0, sz.init, sz.dfc_offset, sz.dfc_offset + sz.c, sz.dfc_offset + 2 * sz.c)[index]
    size = (sz.init, sz.new, sz.c, sz.c, sz.c)[index]
    return grads.bn_bias[start:start + size], grads.bn_weight[start:start + size]


def _dfc_conv_grad(dzn_out, z_out, bn_out, out_sums, z_in, weight, bn_in, dzn_in, partials: Partials, row, sz,
                   vertical, training):
    """Through bn_out and the (K, 1) / (1, K) conv: dzn_in, BN sums and weight-gradient partials from ``row``."""
    _dfc_conv_grad_kernel[lambda meta: (triton.cdiv(sz.c, meta["BC"]), sz.quarter_tiles)](
        dzn_out, z_out, *_bn(bn_out, z_out), *out_sums, z_in, weight.contiguous(), *_bn(bn_in, z_in), dzn_in,
        partials.buffer, partials.t_max, row, sz.n, sz.c, sz.h, sz.w, K=sz.k, VERTICAL=vertical, TRAINING=training,
        CL=sz.cl, ACC=sz.acc, TB=tap_block(sz.k), BQ=sz.quarter_block)


def _allocate_gradients(x, ghost, dfc, features, sz) -> Gradients:
    """Outputs for every gradient (zero-size placeholders for absent parts), each written by exactly one kernel."""
    def like(t):
        return backends.empty(t.shape, like=t) if t is not None else x.new_empty(0)

    acc = acc_dtype(x.dtype)
    return Gradients(
        backends.empty(x.shape, like=x, memory_format=sz.fmt),
        backends.empty(features.shape, like=x, memory_format=sz.fmt) if features is not None else None,
        like(ghost.primary_weight if ghost else None), like(ghost.cheap_weight if ghost else None),
        like(dfc.conv_weight if dfc else None), like(dfc.horizontal_weight if dfc else None),
        like(dfc.vertical_weight if dfc else None), backends.empty((sz.stats,), like=x, dtype=acc),
        backends.empty((sz.stats,), like=x, dtype=acc))


def _present(grads: Gradients, ghost, dfc, features) -> Gradients:
    """None for the weights of an absent part."""
    return grads._replace(
        features=grads.features if features is not None and ghost is None else None,
        primary_weight=grads.primary_weight if ghost else None, cheap_weight=grads.cheap_weight if ghost else None,
        conv_weight=grads.conv_weight if dfc else None, horizontal_weight=grads.horizontal_weight if dfc else None,
        vertical_weight=grads.vertical_weight if dfc else None)


def _empty_gradients(x, ghost, dfc, features, sz) -> Gradients:
    """An empty batch: every weight and BatchNorm gradient is zero."""
    def zeros(t):
        return torch.zeros_like(t) if t is not None else None

    acc = acc_dtype(x.dtype)
    return Gradients(torch.zeros_like(x), zeros(features) if ghost is None else None,
                     zeros(ghost.primary_weight) if ghost else None, zeros(ghost.cheap_weight) if ghost else None,
                     zeros(dfc.conv_weight) if dfc else None, zeros(dfc.horizontal_weight) if dfc else None,
                     zeros(dfc.vertical_weight) if dfc else None, x.new_zeros(sz.stats, dtype=acc),
                     x.new_zeros(sz.stats, dtype=acc))
