"""``ghostfused.convert``: swap fused Ghost modules into any model."""

import warnings

import torch.nn as nn

from . import backends
from .nn import GhostModuleV2, unfusable_reason


def is_ghost_module(module: nn.Module) -> bool:
    """A Ghost module of any origin: it has ``primary_conv`` and ``cheap_operation`` submodules."""
    return isinstance(getattr(module, "primary_conv", None), nn.Module) and \
        isinstance(getattr(module, "cheap_operation", None), nn.Module)


def _fused(module: nn.Module, name: str, backend: str) -> nn.Module:
    if isinstance(module, GhostModuleV2) and module.fallback_reason is None:
        module.backend = backend
        return module
    reason = unfusable_reason(module)
    if reason is not None:
        warnings.warn(f"ghostfused.convert: left {name or 'the model'} ({type(module).__name__}) unfused: {reason}",
                      stacklevel=3)
        return module
    return GhostModuleV2.from_module(module, backend)


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every Ghost module in ``model`` by a fused :class:`ghostfused.nn.GhostModuleV2`, in place.

    Recognises our modules, the official GhostNet / GhostNetV2 code's and timm's ``GhostModule`` /
    ``GhostModuleV2`` (by their ``primary_conv``, ``cheap_operation`` and, in 'attn' mode, ``short_conv``). The
    fused modules share the originals' parameter and buffer tensors, so state-dict keys and values are unchanged,
    as are outputs and gradients. A Ghost module the fused ops cannot compute stays as it is, with one warning
    naming it. ``backend`` is 'auto', 'eager', 'triton', 'cpu' or 'cuda'. Returns ``model`` (or the fused module
    when ``model`` is itself a Ghost module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    backend = backends.check_name(backend)
    if backend != "auto":
        backends.require(backend)
    if is_ghost_module(model):
        return _fused(model, "", backend)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if is_ghost_module(child):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                fused = _fused(child, name, backend)
                if fused is not child:
                    setattr(parent, child_name, fused)
    return model
