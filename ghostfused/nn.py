"""Fused drop-in modules: the reference modules with their forward routed through the ``ghostfused`` ops.

Parameters, buffers, attribute names and state-dict keys are those of ``ghostfused.reference`` (the official
layout). A configuration the fused ops do not cover (a primary kernel or stride other than 1, an activation other
than ReLU, a BatchNorm without running statistics) runs the reference forward instead; so does a module whose
BatchNorms disagree on train / eval mode, or on the process group they synchronise over. ``nn.SyncBatchNorm``
layers are fused too: while they synchronise (training under ``torch.distributed`` with more than one process) the
fused ops normalise over the whole group's batch (``ghostfused.distributed``).
"""

import torch.nn as nn
from torch import Tensor

from . import backends, ops, reference
from .ops.batch_norm import is_fusable, sync_process_group


def _activation_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0):
        return "identity"
    return None


def _is_plain_conv(conv, kernel_size, groups, padding) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.bias is None and conv.kernel_size == kernel_size
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == groups
            and conv.padding == padding and conv.padding_mode == "zeros")


def ghost_module_oup(module: nn.Module) -> int | None:
    """Output channels of a Ghost module (``oup`` in the official code, ``out_chs`` in timm's)."""
    oup = getattr(module, "oup", getattr(module, "out_chs", None))
    return oup if isinstance(oup, int) else None


def unfusable_reason(module: nn.Module) -> str | None:
    """Why the fused ops cannot compute Ghost module ``module`` (None when they can)."""
    branches = [getattr(module, "primary_conv", None), getattr(module, "cheap_operation", None)]
    if not all(isinstance(b, nn.Sequential) and len(b) == 3 for b in branches):
        return "primary_conv and cheap_operation must be Sequential(conv, BatchNorm2d, activation)"
    (primary, primary_bn, primary_act), (cheap, cheap_bn, cheap_act) = branches
    if not isinstance(primary, nn.Conv2d) or not _is_plain_conv(primary, (1, 1), 1, (0, 0)):
        return "the primary convolution must be 1x1 with stride 1, no bias (kernel_size=1, stride=1)"
    init = primary.out_channels
    dw = cheap.kernel_size[0] if isinstance(cheap, nn.Conv2d) else 0
    if (not _is_plain_conv(cheap, (dw, dw), init, (dw // 2, dw // 2)) or dw % 2 == 0
            or cheap.in_channels != init or cheap.out_channels % init != 0):
        return "the cheap operation must be a depthwise convolution with an odd square kernel, stride 1, no bias"
    acts = {_activation_kind(primary_act), _activation_kind(cheap_act)}
    if len(acts) != 1 or None in acts:
        return "both activations must be ReLU, or both identity"
    oup = ghost_module_oup(module)
    if oup is None or not init <= oup <= init + cheap.out_channels:
        return "the module has no valid output channel count (oup / out_chs)"
    bns = [primary_bn, cheap_bn]
    short = getattr(module, "short_conv", None)
    if short is not None:
        if not isinstance(short, nn.Sequential) or len(short) != 6:
            return "short_conv must be Sequential(conv, BN, conv(1, K), BN, conv(K, 1), BN)"
        k = short[2].kernel_size[1] if isinstance(short[2], nn.Conv2d) else 0
        if (not _is_plain_conv(short[0], (1, 1), 1, (0, 0)) or short[0].out_channels != oup
                or short[0].in_channels != primary.in_channels
                or not _is_plain_conv(short[2], (1, k), oup, (0, k // 2))
                or not _is_plain_conv(short[4], (k, 1), oup, (k // 2, 0)) or k % 2 == 0):
            return "short_conv must hold a 1x1 stride-1 convolution and (1, K), (K, 1) depthwise ones, K odd"
        if not isinstance(getattr(module, "gate_fn", nn.Sigmoid()), nn.Sigmoid):
            return "gate_fn must be nn.Sigmoid"
        bns += [short[1], short[3], short[5]]
    if not all(is_fusable(bn) for bn in bns):
        return "every BatchNorm must be an affine nn.BatchNorm2d (or SyncBatchNorm) that tracks running statistics"
    return None


class GhostModuleV2(reference.GhostModuleV2):
    """:class:`ghostfused.reference.GhostModuleV2` computed by the fused ops.

    Same arguments (plus ``backend``: 'auto', 'eager', 'triton', 'cpu' or 'cuda'), attributes and state dict.
    'original' mode runs ``ghostfused::ghost_concat``, 'attn' mode ``ghostfused::ghost_attn``.
    Shapes: ``[N, inp, H, W] -> [N, oup, H, W]``.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backends.check_name(backend)
        self.fallback_reason = unfusable_reason(self)

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "GhostModuleV2":
        """A fused module that shares ``module``'s submodules, so its parameters, buffers and state-dict keys.

        ``module`` is any Ghost module the fused ops cover (ours, the official code's, timm's ``GhostModule`` /
        ``GhostModuleV2``); raises ValueError naming the reason otherwise.
        """
        reason = unfusable_reason(module)
        if reason is not None:
            raise ValueError(f"cannot fuse {type(module).__name__}: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.mode = "attn" if getattr(module, "short_conv", None) is not None else "original"
        fused.oup = ghost_module_oup(module)
        fused.upsample = getattr(module, "upsample", "nearest")
        fused.gate_fn = getattr(module, "gate_fn", nn.Sigmoid())
        fused.primary_conv = module.primary_conv
        fused.cheap_operation = module.cheap_operation
        if fused.mode == "attn":
            fused.short_conv = module.short_conv
        fused.backend = backends.check_name(backend)
        fused.fallback_reason = None
        fused.training = module.training  # not .train(): that would reset frozen BatchNorms
        return fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fallback_reason is not None:
            return super().forward(x)
        # Layers through the containers' dicts: Sequential indexing and slicing cost more than a small kernel.
        modules = self._modules
        primary, primary_bn, primary_act = modules["primary_conv"]._modules.values()
        cheap, cheap_bn, _ = modules["cheap_operation"]._modules.values()
        short = tuple(modules["short_conv"]._modules.values()) if self.mode == "attn" else ()
        bns = (primary_bn, cheap_bn, *short[1::2])
        training = primary_bn.training
        if any(bn.training != training for bn in bns) or len({sync_process_group(bn) for bn in bns}) > 1:
            return super().forward(x)
        relu = isinstance(primary_act, nn.ReLU)
        if self.mode == "original":
            return ops.ghost_concat(x, primary.weight, primary_bn, cheap.weight, cheap_bn, self.oup, relu=relu,
                                    training=training, backend=self.backend)
        return ops.ghost_attn(x, primary.weight, primary_bn, cheap.weight, cheap_bn, short[0].weight, short[1],
                              short[2].weight, short[3], short[4].weight, short[5], self.oup, relu=relu,
                              upsample=self.upsample, training=training, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, oup={self.oup}, backend={self.backend!r}"


class GhostBottleneckV2(reference.GhostBottleneckV2):
    """:class:`ghostfused.reference.GhostBottleneckV2` whose two Ghost modules are fused (``backend`` as above)."""

    ghost_module = GhostModuleV2

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.ghost1.backend = self.ghost2.backend = backends.check_name(backend)
