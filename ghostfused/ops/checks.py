"""Argument validation shared by the public op functions (SPEC section 5).

Every failure names the argument and what was expected: ``TypeError`` for wrong types and dtypes, ``ValueError``
for wrong shapes, values and devices. Checks run before any kernel launch.
"""

from typing import Sequence

import torch
from torch import Tensor

from .batch_norm import BatchNorm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(value, name: str) -> None:
    """``value`` is a tensor (TypeError naming ``name`` otherwise)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_input(x, name: str = "x") -> None:
    """``x`` is a 4-D floating-point tensor ``[N, C, H, W]`` with H, W >= 1 (N may be 0)."""
    check_tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:  # eager convolutions refuse empty images (an empty batch is fine)
        raise ValueError(f"{name} must have H >= 1 and W >= 1, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_device(t: Tensor, name: str, like: Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}: all tensors must share one device")


def check_weight(weight, name: str, shape: Sequence[int], like: Tensor) -> None:
    """A convolution weight of exactly ``shape``, on x's device and in x's dtype."""
    check_tensor(weight, name)
    _check_device(weight, name, like)
    if weight.dtype != like.dtype:
        raise TypeError(f"{name} must have x's dtype {like.dtype}, got {weight.dtype}")
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(weight.shape)}")


def check_batch_norms(x: Tensor, channels: Sequence[int], bn_weight, bn_bias, bn_mean, bn_var, bn_eps,
                      names: Sequence[str] | None = None) -> None:
    """One BatchNorm per entry of ``channels``: weight, bias, mean and var tensors of ``[channels[i]]`` on x's device,
    in x's dtype (or float32 for a float16 / bfloat16 x: the mixed precision ``F.batch_norm`` allows), and a positive
    eps.

    The lists are a fused op's ``bn_weight, bn_bias, bn_mean, bn_var, bn_eps`` arguments. Messages name the BatchNorms
    by ``names`` (``primary_bn.weight``, ``primary_bn.eps``) when given, else by the schema (``bn_weight[0]``).
    """
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    fields = (("bn_weight", "weight", bn_weight), ("bn_bias", "bias", bn_bias), ("bn_mean", "running_mean", bn_mean),
              ("bn_var", "running_var", bn_var), ("bn_eps", "eps", bn_eps))
    for list_name, field, values in fields:
        if not isinstance(values, (list, tuple)) or len(values) != len(channels):
            got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"{list_name} must be a list of {len(channels)} entries (one per BatchNorm), got {got}")
        for i, (value, count) in enumerate(zip(values, channels)):
            if field == "eps":
                if not value > 0:
                    raise ValueError(f"{_bn_name(names, list_name, field, i)} must be positive, got {value}")
                continue
            if not (isinstance(value, Tensor) and value.device == x.device and value.dtype in allowed
                    and value.shape == (count,)):  # the common case in one test; the messages below name the fault
                full = _bn_name(names, list_name, field, i)
                check_tensor(value, full)
                _check_device(value, full, x)
                if value.dtype not in allowed:
                    raise TypeError(f"{full} must be {' or '.join(map(str, allowed))} for x of {x.dtype}, "
                                    f"got {value.dtype}")
                raise ValueError(f"{full} must have shape ({count},), got {tuple(value.shape)}")


def _bn_name(names: Sequence[str] | None, list_name: str, field: str, i: int) -> str:
    return f"{names[i]}.{field}" if names else f"{list_name}[{i}]"


def check_momentum(bn: BatchNorm, name: str) -> None:
    """``bn.momentum`` is in [0, 1] or None (a cumulative average)."""
    if bn.momentum is not None and not 0.0 <= bn.momentum <= 1.0:
        raise ValueError(f"{name}.momentum must be in [0, 1] or None, got {bn.momentum}")


def check_grad_out(grad_out, x: Tensor, expected: Sequence[int]) -> None:
    """A backward's ``grad_out``: of the output's shape ``expected``, with x's dtype and device."""
    check_input(grad_out, "grad_out")
    _check_device(grad_out, "grad_out", x)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    expected = tuple(expected)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out must have shape {expected}, got {tuple(grad_out.shape)}")


def check_training_count(count: int, name: str, training: bool) -> None:
    """Training needs more than one value per channel, as ``nn.BatchNorm2d`` requires."""
    if training and count == 1:
        raise ValueError(f"{name}: expected more than 1 value per channel when training (N * H * W == 1)")


def check_oup(oup, init: int, new: int) -> None:
    """``oup`` lies between the primary channels and primary + cheap channels."""
    if not isinstance(oup, int) or isinstance(oup, bool):
        raise TypeError(f"oup must be an int, got {type(oup).__name__}")
    if not init <= oup <= init + new:
        raise ValueError(f"oup must be in [{init}, {init + new}] (primary {init} + cheap {new} channels), got {oup}")


def check_attn_size(x: Tensor) -> None:
    """The DFC gate is a 2x2 average pool of x: H and W must be at least 2."""
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x must have H >= 2 and W >= 2 for the DFC attention's 2x2 pooling, "
                         f"got H={x.shape[2]}, W={x.shape[3]}")


def check_dfc_weights(conv_weight, horizontal_weight, vertical_weight, x: Tensor, channels: int) -> int:
    """The DFC branch weights: ``[C, Cin, 1, 1]``, ``[C, 1, 1, K]``, ``[C, 1, K, 1]`` with K odd; returns K."""
    check_weight(conv_weight, "conv_weight", (channels, x.shape[1], 1, 1), x)
    check_tensor(horizontal_weight, "horizontal_weight")
    k = horizontal_weight.shape[-1] if horizontal_weight.dim() == 4 else -1
    if k < 1 or k % 2 == 0:
        raise ValueError(f"horizontal_weight must have shape [C, 1, 1, K] with K odd, "
                         f"got {tuple(horizontal_weight.shape)}")
    check_weight(horizontal_weight, "horizontal_weight", (channels, 1, 1, k), x)
    check_weight(vertical_weight, "vertical_weight", (channels, 1, k, 1), x)
    return k


def check_ghost_weights(primary_weight, cheap_weight, x: Tensor) -> tuple[int, int]:
    """Primary ``[init, Cin, 1, 1]`` and cheap ``[new, 1, dw, dw]`` (dw odd, new a multiple of init)."""
    check_tensor(primary_weight, "primary_weight")
    if primary_weight.dim() != 4:
        raise ValueError(f"primary_weight must be a 4-D tensor [init, Cin, 1, 1], "
                         f"got shape {tuple(primary_weight.shape)}")
    init = primary_weight.shape[0]
    if init == 0:
        raise ValueError("primary_weight must have at least one output channel, got shape (0, ...)")
    check_weight(primary_weight, "primary_weight", (init, x.shape[1], 1, 1), x)
    check_tensor(cheap_weight, "cheap_weight")
    if cheap_weight.dim() != 4:
        raise ValueError(f"cheap_weight must be a 4-D tensor [new, 1, dw, dw], got shape {tuple(cheap_weight.shape)}")
    new, dw = cheap_weight.shape[0], cheap_weight.shape[-1]
    if new == 0 or new % init != 0 or dw % 2 == 0:
        raise ValueError(f"cheap_weight must have shape [new, 1, dw, dw] with new a multiple of init={init} and "
                         f"dw odd, got {tuple(cheap_weight.shape)}")
    check_weight(cheap_weight, "cheap_weight", (new, 1, dw, dw), x)
    return init, new


def check_upsample(upsample) -> None:
    if upsample not in ("nearest", "bilinear"):
        raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")


def check_depthwise_weight(weight, x: Tensor) -> int:
    """A depthwise convolution's weight ``[C, 1, k, k]`` (k odd) for x of C channels; returns k."""
    check_tensor(weight, "weight")
    k = weight.shape[-1] if weight.dim() == 4 else -1
    if k < 1 or k % 2 == 0:
        raise ValueError(f"weight must have shape [C, 1, k, k] with k odd, got {tuple(weight.shape)}")
    check_weight(weight, "weight", (x.shape[1], 1, k, k), x)
    return k


def check_stride(stride) -> None:
    if not isinstance(stride, int) or isinstance(stride, bool):
        raise TypeError(f"stride must be an int, got {type(stride).__name__}")
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
