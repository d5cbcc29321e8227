"""GhostNetV2 models: the reference network, fused by ``ghostfused.convert``, and the official checkpoint loader."""

import os
from typing import Mapping

import torch
import torch.nn as nn

from ..convert import convert
from ..reference import GhostNetV2


def ghostnetv2(width: float = 1.0, num_classes: int = 1000, dropout: float = 0.2, backend: str | None = "auto",
               **kwargs) -> nn.Module:
    """GhostNetV2 of channel ``width`` (1.0, 1.3, 1.6 in the paper); ``[N, 3, H, W] -> [N, num_classes]``.

    ``backend`` ('auto', 'eager', 'triton', 'cpu', 'cuda') runs the Ghost modules through the fused ops;
    ``backend=None`` returns the plain PyTorch reference model. Further keyword arguments (``dfc_kernel_size``,
    ``upsample``) go to :class:`ghostfused.reference.GhostNetV2`. The state-dict layout is the official one.
    """
    model = GhostNetV2(width=width, num_classes=num_classes, dropout=dropout, **kwargs)
    return model if backend is None else convert(model, backend)


def ghostnetv2_100(**kwargs) -> nn.Module:
    """GhostNetV2-1.0x (about 6.16 M parameters)."""
    return ghostnetv2(width=1.0, **kwargs)


def ghostnetv2_130(**kwargs) -> nn.Module:
    """GhostNetV2-1.3x (about 8.96 M parameters)."""
    return ghostnetv2(width=1.3, **kwargs)


def ghostnetv2_160(**kwargs) -> nn.Module:
    """GhostNetV2-1.6x (about 12.39 M parameters)."""
    return ghostnetv2(width=1.6, **kwargs)


def official_state_dict(path_or_state_dict) -> dict:
    """A state dict in our layout from an official checkpoint: a path or a mapping, with or without a
    ``state_dict`` entry; thop's ``total_ops`` / ``total_params`` entries dropped."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    elif isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        raise TypeError(f"path_or_state_dict must be a path or a mapping, got {type(path_or_state_dict).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return {key: value for key, value in state.items()
            if not key.endswith(("total_ops", "total_params"))}


def load_official(model: nn.Module, path_or_state_dict, strict: bool = True) -> nn.Module:
    """Load an official GhostNetV2 checkpoint (or a timm state dict) into ``model``; returns ``model``."""
    model.load_state_dict(official_state_dict(path_or_state_dict), strict=strict)
    return model
