"""Mixed precision: under ``torch.autocast`` the fused ops compute what the eager Ghost module computes.

Eager autocast runs every convolution in the autocast dtype (its input and weight are cast; float64 tensors are
left alone) and BatchNorm in its input's dtype with the parameters as they are (float32, statistics in float32).
The fused ops take x and the convolution weights in one dtype, so the public op functions cast those tensors the
way autocast casts a convolution's arguments and leave the BatchNorm tensors alone. The cast is an ordinary
differentiable ``Tensor.to``: float32 weights receive float32 gradients. ``torch.compile`` traces it.
"""

import torch
from torch import Tensor


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs convolutions in on ``device`` now, or None when autocast is off there."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_for_autocast(x: Tensor, *weights):
    """``(x, *weights)`` cast to the autocast dtype of x's device, as autocast casts a convolution's arguments
    (floating-point tensors other than float64); unchanged when autocast is off. Non-tensors pass through, so that
    argument checks after the cast still name them."""
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return (x, *weights)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (x, *weights))
