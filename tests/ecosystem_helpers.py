"""Helpers of the ecosystem tests (compile, autocast, channels_last, distributed, ONNX, timm)."""

import pytest
import torch
import torch.nn as nn

import ghostfused
from ghostfused import backends, reference

from helpers import randomize_batch_norms

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_backends() -> list[str]:
    """Backends that run on CUDA tensors here (empty without a GPU)."""
    if not torch.cuda.is_available():
        return []
    return [b for b in ghostfused.available_backends() if backends.supports_device(b, torch.device("cuda"))]


OUT_CHANNELS = 6  # of two_ghost_modules


def two_ghost_modules(inp: int = 5, dtype=torch.float32) -> nn.Sequential:
    """An 'attn' Ghost module of odd output channels, a ReLU and an 'original' one without activation (as ghost1 and
    ghost2 of a bottleneck); random weights and BatchNorm state. ``[N, inp, H, W] -> [N, OUT_CHANNELS, H, W]``."""
    model = nn.Sequential(reference.GhostModuleV2(inp, 7, mode="attn"), nn.ReLU(),
                          reference.GhostModuleV2(7, OUT_CHANNELS, mode="original", relu=False))
    return randomize_batch_norms(model).to(dtype)


def fused_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ghostfused.nn.GhostModuleV2)]
