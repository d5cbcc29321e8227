"""Argument validation shared by the public op functions (SPEC section 5).

Every failure names the argument and what was expected: ``TypeError`` for wrong types and dtypes, ``ValueError``
for wrong shapes, values and devices. Checks run before any kernel launch.
"""

from typing import Sequence

import torch
from torch import Tensor

from .batch_norm import BatchNorm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_input(x, name: str = "x") -> None:
    """``x`` is a 4-D floating-point tensor ``[N, C, H, W]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_device(t: Tensor, name: str, like: Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}: all tensors must share one device")


def check_weight(weight, name: str, shape: Sequence[int], like: Tensor) -> None:
    """A convolution weight of exactly ``shape``, on x's device and in x's dtype."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    _check_device(weight, name, like)
    if weight.dtype != like.dtype:
        raise TypeError(f"{name} must have x's dtype {like.dtype}, got {weight.dtype}")
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(weight.shape)}")


def check_batch_norm(bn: BatchNorm, name: str, channels: int, like: Tensor) -> None:
    """BatchNorm tensors of ``[channels]`` on x's device, in x's dtype or float32 (as ``F.batch_norm`` allows)."""
    for field in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, field)
        full = f"{name}.{field}"
        if not isinstance(t, Tensor):
            raise TypeError(f"{full} must be a torch.Tensor, got {type(t).__name__}")
        _check_device(t, full, like)
        if t.dtype not in (like.dtype, torch.float32):
            raise TypeError(f"{full} must be {like.dtype} or float32, got {t.dtype}")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{full} must have shape ({channels},), got {tuple(t.shape)}")
    if bn.momentum is not None and not 0.0 <= bn.momentum <= 1.0:
        raise ValueError(f"{name}.momentum must be in [0, 1] or None, got {bn.momentum}")
    if not bn.eps > 0:
        raise ValueError(f"{name}.eps must be positive, got {bn.eps}")


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
    if not isinstance(horizontal_weight, Tensor):
        raise TypeError(f"horizontal_weight must be a torch.Tensor, got {type(horizontal_weight).__name__}")
    k = horizontal_weight.shape[-1] if horizontal_weight.dim() == 4 else -1
    if k < 1 or k % 2 == 0:
        raise ValueError(f"horizontal_weight must have shape [C, 1, 1, K] with K odd, "
                         f"got {tuple(horizontal_weight.shape)}")
    check_weight(horizontal_weight, "horizontal_weight", (channels, 1, 1, k), x)
    check_weight(vertical_weight, "vertical_weight", (channels, 1, k, 1), x)
    return k


def check_ghost_weights(primary_weight, cheap_weight, x: Tensor) -> tuple[int, int]:
    """Primary ``[init, Cin, 1, 1]`` and cheap ``[new, 1, dw, dw]`` (dw odd, new a multiple of init)."""
    if not isinstance(primary_weight, Tensor) or primary_weight.dim() != 4:
        raise ValueError("primary_weight must be a 4-D tensor [init, Cin, 1, 1]")
    init = primary_weight.shape[0]
    check_weight(primary_weight, "primary_weight", (init, x.shape[1], 1, 1), x)
    if not isinstance(cheap_weight, Tensor) or cheap_weight.dim() != 4:
        raise ValueError("cheap_weight must be a 4-D tensor [new, 1, dw, dw]")
    new, dw = cheap_weight.shape[0], cheap_weight.shape[-1]
    if new == 0 or new % init != 0 or dw % 2 == 0:
        raise ValueError(f"cheap_weight must have shape [new, 1, dw, dw] with new a multiple of init={init} and "
                         f"dw odd, got {tuple(cheap_weight.shape)}")
    check_weight(cheap_weight, "cheap_weight", (new, 1, dw, dw), x)
    return init, new


def check_upsample(upsample) -> None:
    if upsample not in ("nearest", "bilinear"):
        raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
