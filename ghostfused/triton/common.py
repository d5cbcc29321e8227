"""Shared pieces of the Triton backend: launch configuration, tensor addressing, BatchNorm algebra, deterministic
reductions of per-tile partials, and the upsampling index tables.

Conventions of every kernel in this package:

* Full-resolution tensors (x, the output, grad_out, internal scratch) are dense in x's memory format (contiguous or
  channels_last), so element (n, c, pixel) sits at :func:`offset` with the constexpr ``CL``; quarter-resolution
  tensors use the same format. Pixels are flattened ``i * W + j``.
* ``ACC`` is the accumulation dtype: float64 for float64 inputs, float32 otherwise. Products of float16 / bfloat16
  operands accumulate in float32.
* Train-mode statistics and every gradient summed over pixels leave the kernel that produces them as per-tile
  partials ``[rows, tiles]``; :class:`Partials` reduces them in a fixed order (no atomics, so results are bitwise
  reproducible for a given launch configuration).
"""

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs, key, interpreted):
    """``triton.autotune`` over ``configs`` on a GPU; the interpreter (which runs a single config only) gets
    ``interpreted``. Tuned parameters must not change partial-buffer shapes (pixel tiles are chosen by the host)."""
    return triton.autotune(configs=[interpreted] if INTERPRETED else configs, key=key)


def device_function(fn):
    """``triton.jit`` for a device helper called from kernels. Under the interpreter it stays a plain Python
    function: the interpreter re-patches ``triton.language`` on every call of a jitted helper (about 1 ms, most
    of an interpreted test's time), while the calling kernel already runs with the language patched."""
    return fn if INTERPRETED else triton.jit(fn)


def pixel_block(count: int, gpu: int) -> int:
    """Pixel (or cell) tile size: ``gpu`` on a GPU; under the interpreter, which runs programs one after another at
    a few ms each, one tile for the small test shapes, up to 256 (at least 16, the smallest ``tl.dot`` operand)."""
    if INTERPRETED:
        return max(16, min(triton.next_power_of_2(max(count, 1)), 256))
    return gpu


def tap_block(taps: int) -> int:
    """Stencil taps processed together (a third tensor dimension): one at a time on a GPU (a static loop, no
    padding lanes); all of them under the interpreter, where each operation costs ~0.1 ms whatever its size."""
    return triton.next_power_of_2(taps) if INTERPRETED else 1


def reduction_block(size: int) -> int:
    """Block over a GEMM reduction dimension (channels): the next power of two from 16 up to 64."""
    return min(max(16, triton.next_power_of_2(size)), 64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype for inputs of ``dtype`` (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def scratch(shape, like: torch.Tensor, channels_last: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An internal buffer every element of which a kernel writes before any is read."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


# ---------------------------------------------------------------------------------------------------------------
# Device helpers.


@device_function
def offset(n, c, p, C, PIX, CL: tl.constexpr):
    """Element offset of (n, c, pixel p) in a dense [N, C, PIX] tensor, NCHW or NHWC (CL); 64-bit."""
    n = n.to(tl.int64)
    if CL:
        return (n * PIX + p) * C + c
    return (n * C + c) * PIX + p


@device_function
def mm(a, b):
    """``a @ b`` accumulated in float32 (float64 for float64 operands). float32 and float64 ask for IEEE precision
    (no TF32: the tests compare with eager at float32 tolerances); float64 ``tl.dot`` is exact in the interpreter
    (checked) and lowers to FMAs or fp64 MMA on a GPU (not verified in this session: no GPU)."""
    if a.dtype == tl.float32 or a.dtype == tl.float64:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@device_function
def relu(v, RELU: tl.constexpr):
    """ReLU that keeps NaN (as torch.relu does), or the identity."""
    if RELU:
        return tl.where(v < 0, 0.0, v)
    return v


@device_function
def relu_grad(grad, pre, RELU: tl.constexpr):
    """Gradient through :func:`relu` of pre-activation ``pre`` (zero where the output is not positive)."""
    if RELU:
        return tl.where(pre > 0, grad, 0.0)
    return grad


@device_function
def bn_params(weight, bias, mean, var, eps, c, mask, ACC: tl.constexpr):
    """``(scale, shift, mean, rstd)`` of BatchNorm channels ``c``: ``bn(y) = scale * y + shift``."""
    gamma = tl.load(weight + c, mask=mask, other=0.0).to(ACC)
    beta = tl.load(bias + c, mask=mask, other=0.0).to(ACC)
    mu = tl.load(mean + c, mask=mask, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.load(var + c, mask=mask, other=1.0).to(ACC) + eps)
    scale = gamma * rstd
    return scale, beta - mu * scale, mu, rstd


@device_function
def bn_grad_terms(grad_bias, grad_weight, c, mask, count, scale, mu, rstd, TRAINING: tl.constexpr):
    """Coefficients ``(a, b, k)`` with ``grad_y = a * grad_bn_out + b * y + k`` (the BatchNorm input gradient).

    ``grad_bias`` / ``grad_weight`` hold the reduced ``sum(grad_bn_out)`` and ``sum(grad_bn_out * y_hat)`` of
    channels c, over ``count`` values each. In training the batch statistics depend on y, so the gradient has the
    b and k terms; in eval the statistics are constants and only ``a`` is meaningful.
    """
    if TRAINING:
        inv = 1.0 / count.to(scale.dtype)
        s1 = tl.load(grad_bias + c, mask=mask, other=0.0).to(scale.dtype) * inv
        s2 = tl.load(grad_weight + c, mask=mask, other=0.0).to(scale.dtype) * inv
        b = -scale * rstd * s2
        return scale, b, -scale * s1 - b * mu
    return scale, scale * 0.0, scale * 0.0


@device_function
def store_moments(part, ROWS, T_MAX, rows, row_mask, t, values, valid):
    """Tile ``t``'s (count, mean, M2) of ``values`` [B, P] over ``valid`` [B, P], per row, into the partial
    buffer ``[3, ROWS, T_MAX]`` (Chan et al.'s parallel variance: robust where sum and sum of squares cancel)."""
    count = tl.sum(valid.to(values.dtype), axis=1)
    mean = tl.sum(tl.where(valid, values, 0.0), axis=1) / tl.maximum(count, 1.0)
    deviation = tl.where(valid, values - mean[:, None], 0.0)
    base = part + rows.to(tl.int64) * T_MAX + t
    plane = ROWS * T_MAX
    tl.store(base, count, mask=row_mask)
    tl.store(base + plane, mean, mask=row_mask)
    tl.store(base + 2 * plane, tl.sum(deviation * deviation, axis=1), mask=row_mask)


@device_function
def store_sums(part, T_MAX, rows, row_mask, t, values, valid):
    """Tile ``t``'s sum over axis 1 of ``values`` ([B, P] or [B, P, TB]) where ``valid``, into the partial buffer
    ``[ROWS, T_MAX]`` at ``rows`` ([B] or [B, TB])."""
    tl.store(part + rows.to(tl.int64) * T_MAX + t, tl.sum(tl.where(valid, values, 0.0), axis=1), mask=row_mask)


# ---------------------------------------------------------------------------------------------------------------
# Reductions of per-tile partials. Rows below ``split`` hold ``tiles_a`` tiles, the others ``tiles_b`` (two kernels
# of one stage may tile differently); both are summed in increasing tile order.


@triton.jit
def _finalize_moments_kernel(part, ROWS, T_MAX, SPLIT, TILES_A, TILES_B, mean_out, var_out, OUT_OFFSET, GAP,
                             BR: tl.constexpr, BT: tl.constexpr):
    """Mean and biased variance per row from the tiles' (count, mean, M2), combined block by block (Chan et al.)
    into mean_out / var_out at OUT_OFFSET + row (+ GAP past SPLIT)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < ROWS
    tiles = tl.where(rows < SPLIT, TILES_A, TILES_B)
    plane = ROWS * T_MAX
    ACC = mean_out.dtype.element_ty
    count = tl.zeros((BR,), ACC)
    mean = tl.zeros((BR,), ACC)
    m2 = tl.zeros((BR,), ACC)
    for t0 in range(0, T_MAX, BT):
        t = t0 + tl.arange(0, BT)
        ok = row_ok[:, None] & (t[None, :] < tiles[:, None])
        at = part + rows[:, None].to(tl.int64) * T_MAX + t[None, :]
        n_t = tl.load(at, mask=ok, other=0.0)
        mean_t = tl.load(at + plane, mask=ok, other=0.0)
        m2_t = tl.load(at + 2 * plane, mask=ok, other=0.0)
        n_b = tl.sum(n_t, axis=1)
        mean_b = tl.sum(n_t * mean_t, axis=1) / tl.maximum(n_b, 1.0)
        dev = mean_t - mean_b[:, None]
        m2_b = tl.sum(m2_t + n_t * dev * dev, axis=1)
        total = count + n_b
        delta = mean_b - mean
        share = n_b / tl.maximum(total, 1.0)
        mean += delta * share
        m2 += m2_b + delta * delta * count * share
        count = total
    dest = OUT_OFFSET + rows + tl.where(rows < SPLIT, 0, GAP)
    tl.store(mean_out + dest, mean, mask=row_ok)
    tl.store(var_out + dest, m2 / tl.maximum(count, 1.0), mask=row_ok)


@device_function
def _store_segment(total, rows, row_ok, start, end, dest):
    """Rows [start, end) of ``total`` into ``dest`` from its first element, cast to its dtype."""
    tl.store(dest + (rows - start), total.to(dest.dtype.element_ty), mask=row_ok & (rows >= start) & (rows < end))


@triton.jit
def _sum_partials_kernel(part, ROWS, T_MAX, SPLIT, TILES_A, TILES_B, d0, e0, d1, e1, d2, e2, d3, e3, d4, e4, d5, e5,
                         SEGMENTS: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr):
    """Row sums, rows [e_{k-1}, e_k) stored (cast) into d_k from its start, for the first SEGMENTS k."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < ROWS
    tiles = tl.where(rows < SPLIT, TILES_A, TILES_B)
    total = tl.zeros((BR,), part.dtype.element_ty)
    for t0 in range(0, T_MAX, BT):
        t = t0 + tl.arange(0, BT)
        ok = row_ok[:, None] & (t[None, :] < tiles[:, None])
        total += tl.sum(tl.load(part + rows[:, None].to(tl.int64) * T_MAX + t[None, :], mask=ok, other=0.0), axis=1)
    _store_segment(total, rows, row_ok, 0, e0, d0)
    if SEGMENTS > 1:
        _store_segment(total, rows, row_ok, e0, e1, d1)
    if SEGMENTS > 2:
        _store_segment(total, rows, row_ok, e1, e2, d2)
    if SEGMENTS > 3:
        _store_segment(total, rows, row_ok, e2, e3, d3)
    if SEGMENTS > 4:
        _store_segment(total, rows, row_ok, e3, e4, d4)
    if SEGMENTS > 5:
        _store_segment(total, rows, row_ok, e4, e5, d5)


MAX_SEGMENTS = 6


class Partials:
    """A stage's per-tile partial buffer: ``rows`` rows, the first ``split`` written over ``tiles_a`` tiles by one
    kernel, the rest over ``tiles_b`` tiles by another. ``moments`` buffers hold (count, mean, M2) planes."""

    def __init__(self, like: torch.Tensor, split: int, tiles_a: int, rows_b: int = 0, tiles_b: int = 0,
                 moments: bool = False):
        self.rows, self.split = split + rows_b, split
        self.tiles_a, self.tiles_b = tiles_a, tiles_b if rows_b else tiles_a
        self.t_max = max(self.tiles_a, self.tiles_b, 1)
        shape = (3, self.rows, self.t_max) if moments else (self.rows, self.t_max)
        self.buffer = torch.empty(shape, dtype=acc_dtype(like.dtype), device=like.device)

    def _grid(self):
        return (triton.cdiv(self.rows, _BR),)

    def finalize_moments(self, mean_out: torch.Tensor, var_out: torch.Tensor, out_offset: int, gap: int) -> None:
        """Batch mean and biased variance of each row into ``mean_out`` / ``var_out`` at ``out_offset + row``
        (``+ gap`` for rows past ``split``)."""
        _finalize_moments_kernel[self._grid()](self.buffer, self.rows, self.t_max, self.split, self.tiles_a,
                                               self.tiles_b, mean_out, var_out, out_offset, gap, BR=_BR,
                                               BT=_reduce_tiles(self.t_max))

    def sum_into(self, *destinations: torch.Tensor) -> None:
        """Per-row sums over the tiles, consecutive row ranges stored (cast to their dtype) into ``destinations``,
        contiguous tensors whose sizes add up to ``rows`` (at most MAX_SEGMENTS non-empty ones)."""
        destinations = [d for d in destinations if d.numel()]
        assert sum(d.numel() for d in destinations) == self.rows and len(destinations) <= MAX_SEGMENTS
        if not destinations:
            return
        args, end = [], 0
        for d in destinations:
            end += d.numel()
            args += [d, end]
        args += [self.buffer, end] * (MAX_SEGMENTS - len(destinations))
        _sum_partials_kernel[self._grid()](self.buffer, self.rows, self.t_max, self.split, self.tiles_a,
                                           self.tiles_b, *args, SEGMENTS=len(destinations), BR=_BR,
                                           BT=_reduce_tiles(self.t_max))


_BR = 256 if INTERPRETED else 16  # rows per program: one program for the test shapes under the interpreter


def _reduce_tiles(t_max: int) -> int:
    return min(triton.next_power_of_2(t_max), 1024 if INTERPRETED else 64)


# ---------------------------------------------------------------------------------------------------------------
# Upsampling tables. Each full-resolution row i has an owner gate row: PyTorch's nearest source row, or its bilinear
# source index i0 (lam[i] is then the weight of row i0 + 1, 0 at the last row). Owners are non-decreasing, so each
# gate pixel ("cell") owns a rectangle of full-resolution pixels, its children; the cell kernels walk the output
# cell by cell, so that the gate is computed once per cell and its gradient is a sum over the cell's children.


def _axis(size_out: int, size_in: int, mode: str, dtype: torch.dtype):
    """Owner and bilinear weight of each of ``size_out`` rows upsampled from ``size_in``: 'nearest' is
    ``(i * size_in) // size_out``, 'bilinear' is PyTorch's align_corners=False arithmetic in ``acc_dtype(dtype)``,
    'identity' gives every row its own cell."""
    index = torch.arange(size_out, dtype=torch.int64)
    lam = torch.zeros(size_out, dtype=acc_dtype(dtype))
    if mode == "identity":
        owner = index
    elif mode == "nearest":
        owner = (index * size_in) // size_out
    elif mode == "bilinear":
        scale = torch.tensor(size_in, dtype=acc_dtype(dtype)) / size_out
        source = torch.clamp(scale * (index.to(scale.dtype) + 0.5) - 0.5, min=0)
        owner = torch.clamp(torch.floor(source).to(torch.int64), max=size_in - 1)
        lam = torch.where(owner < size_in - 1, torch.clamp(source - owner.to(source.dtype), 0, 1), 0)
    else:
        raise ValueError(f"unknown upsampling mode {mode!r}")
    return owner, lam


class Upsampling:
    """Tables of one upsampling from an ``h x w`` gate to ``H x W`` on ``device``:

    * ``owner_r`` [H], ``owner_c`` [W] (int32) and ``lam_r`` [H], ``lam_c`` [W] (accumulation dtype);
    * ``children`` [h * w * ch] (int32): the pixel index ``i * W + j`` of each cell's children, -1 for padding,
      with ``ch`` (a power of two) slots per cell, row-major within the cell, ``cc`` slots per row.
    """

    def __init__(self, H: int, W: int, h: int, w: int, mode: str, dtype: torch.dtype, device: torch.device):
        owner_r, self.lam_r = _axis(H, h, mode, dtype)
        owner_c, self.lam_c = _axis(W, w, mode, dtype)
        counts_r, counts_c = torch.bincount(owner_r, minlength=h), torch.bincount(owner_c, minlength=w)
        cr, self.cc = triton.next_power_of_2(int(counts_r.max())), triton.next_power_of_2(int(counts_c.max()))
        self.ch = cr * self.cc
        first_r = torch.cumsum(counts_r, 0) - counts_r
        first_c = torch.cumsum(counts_c, 0) - counts_c
        i = first_r[:, None] + torch.arange(cr)  # [h, cr]
        j = first_c[:, None] + torch.arange(self.cc)  # [w, cc]
        valid = ((i < (first_r + counts_r)[:, None])[:, None, :, None]
                 & (j < (first_c + counts_c)[:, None])[None, :, None, :])
        pixel = torch.where(valid, i[:, None, :, None] * W + j[None, :, None, :], -1)
        self.children = pixel.reshape(-1).to(torch.int32).to(device)
        self.owner_r, self.owner_c = owner_r.to(torch.int32).to(device), owner_c.to(torch.int32).to(device)
        self.lam_r, self.lam_c = self.lam_r.to(device), self.lam_c.to(device)


@functools.lru_cache(maxsize=256)
def upsampling(H: int, W: int, h: int, w: int, mode: str, dtype: torch.dtype, device: torch.device) -> Upsampling:
    """The cached :class:`Upsampling` tables (mode 'nearest', 'bilinear' or 'identity' with h, w = H, W)."""
    return Upsampling(H, W, h, w, mode, acc_dtype(dtype), device)
