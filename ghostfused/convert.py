"""``ghostfused.convert``: swap fused Ghost modules (and depthwise convolution + BatchNorm pairs) into any model."""

import warnings

import torch.nn as nn

from . import backends, reference
from .nn import (ConvBnAct, DepthwiseBNSequential, GhostBottleneckV2, GhostModuleV2, GhostNetV2, SqueezeExcite,
                 depthwise_bn_reason, unfusable_reason)


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


def _replace_children(model: nn.Module, replacement) -> None:
    """setattr(parent, name, replacement(child, qualified name)) for every child it does not return as it is."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            new = replacement(child, name)
            if new is not child:
                setattr(parent, child_name, new)


def _fused_bottleneck(module: nn.Module, backend: str) -> nn.Module:
    """Our GhostNetV2 bottleneck with its strided depthwise pair fused."""
    if isinstance(module, GhostBottleneckV2):
        module.backend = backend
        return module
    if type(module) is reference.GhostBottleneckV2:
        return GhostBottleneckV2.from_module(module, backend)
    return module


def _fused_layers(module: nn.Module, backend: str) -> nn.Module:
    """A plain Sequential with (depthwise conv, BatchNorm) pairs (GhostNetV2's shortcut, and any such Sequential) as
    a DepthwiseBNSequential; our SqueezeExcite with linear layers."""
    if isinstance(module, DepthwiseBNSequential):
        module.backend = backend
        return module
    if type(module) is nn.Sequential and any(depthwise_bn_reason(a, b) is None
                                            for a, b in zip(module, list(module)[1:])):
        return DepthwiseBNSequential.from_module(module, backend)
    if type(module) is reference.SqueezeExcite:
        return SqueezeExcite.from_module(module)
    if type(module) is reference.ConvBnAct:
        return ConvBnAct.from_module(module)
    return module


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every Ghost module in ``model`` by a fused :class:`ghostfused.nn.GhostModuleV2`, in place, and fuse
    depthwise convolutions with the BatchNorm after them.

    Recognises our modules, the official GhostNet / GhostNetV2 code's and timm's ``GhostModule`` /
    ``GhostModuleV2`` (by their ``primary_conv``, ``cheap_operation`` and, in 'attn' mode, ``short_conv``). A Ghost
    module the fused ops cannot compute stays as it is, with one warning naming it. Our GhostNetV2 bottlenecks
    become :class:`ghostfused.nn.GhostBottleneckV2` (``conv_dw`` + ``bn_dw`` as one op), and every plain
    ``nn.Sequential`` holding a depthwise convolution followed by a BatchNorm (GhostNetV2's shortcut, in ours and
    timm's models alike) a :class:`ghostfused.nn.DepthwiseBNSequential`; our SqueezeExcite modules compute their
    1x1 convolutions as linear layers (:class:`ghostfused.nn.SqueezeExcite`), our ConvBnAct modules fold their
    BatchNorm in eval mode (:class:`ghostfused.nn.ConvBnAct`), and our GhostNetV2 model becomes, in place, a
    :class:`ghostfused.nn.GhostNetV2` (its stem one kernel of the backend or folded in eval mode, its head a linear
    layer). The fused modules share the originals' parameter and buffer tensors, so state-dict keys and values are
    unchanged, as are outputs and gradients.
    ``backend`` is 'auto', 'eager', 'triton', 'cpu' or 'cuda'. Returns ``model`` (or the fused module when ``model``
    is itself a Ghost module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    backend = backends.check_name(backend)
    if backend != "auto":
        backends.require(backend)
    if is_ghost_module(model):
        return _fused(model, "", backend)
    _replace_children(model, lambda child, name: _fused(child, name, backend) if is_ghost_module(child) else child)
    # Bottlenecks first: a bottleneck's replacement shares its children (shortcut, SqueezeExcite), which the next
    # pass then replaces in it.
    _replace_children(model, lambda child, name: _fused_bottleneck(child, backend))
    _replace_children(model, lambda child, name: _fused_layers(child, backend))
    if type(model) in (reference.GhostNetV2, GhostNetV2):
        model.__class__ = GhostNetV2  # in place: the subclass adds a forward (its stem and head), no state
        model.backend = backend
    return model
