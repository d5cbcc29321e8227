"""Fused drop-in modules: the reference modules with their forward routed through the ``ghostfused`` ops.

Parameters, buffers, attribute names and state-dict keys are those of ``ghostfused.reference`` (the official
layout). A configuration the fused ops do not cover (a primary kernel or stride other than 1, an activation other
than ReLU, a BatchNorm without running statistics) runs the reference forward instead; so does a module whose
BatchNorms disagree on train / eval mode, or on the process group they synchronise over. ``nn.SyncBatchNorm``
layers are fused too: while they synchronise (training under ``torch.distributed`` with more than one process) the
fused ops normalise over the whole group's batch (``ghostfused.distributed``). In eval mode a call that nothing
observes goes from the module straight to the backend's C++ kernel (``ghostfused.ops.define.eval_kernel_output``).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import backends, ops, reference
from .ops.batch_norm import is_fusable, module_schema_lists, sync_process_group
from .ops.define import eval_kernel_output
from .ops.depthwise_bn import output_size
from .ops.stem import stem_kernel_output


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


def _weight(layer: nn.Module) -> Tensor:
    """``layer.weight``, read from its parameter dict when it is there (``nn.Module.__getattr__`` costs more; a
    parametrized layer computes its weight)."""
    weight = layer._parameters.get("weight")
    return weight if weight is not None else layer.weight


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
        for bn in bns:  # a loop, not any() over a generator: this runs at every call
            if bn.training != training:
                return super().forward(x)
        if training and len({sync_process_group(bn) for bn in bns}) > 1:
            return super().forward(x)
        relu = isinstance(primary_act, nn.ReLU)
        if not training:  # inference: the kernel at once where nothing observes the call (eval_kernel_output)
            lists = module_schema_lists(bns)
            if short:
                out = eval_kernel_output("ghost_attn", self.backend, (
                    x, _weight(primary), _weight(cheap), _weight(short[0]), _weight(short[2]), _weight(short[4]),
                    *lists, self.oup, relu, self.upsample, False, None))
            else:
                out = eval_kernel_output("ghost_concat", self.backend, (
                    x, _weight(primary), _weight(cheap), *lists, self.oup, relu, False, None))
            if out is not None:
                return out
        if self.mode == "original":
            return ops.ghost_concat(x, primary.weight, primary_bn, cheap.weight, cheap_bn, self.oup, relu=relu,
                                    training=training, backend=self.backend)
        return ops.ghost_attn(x, primary.weight, primary_bn, cheap.weight, cheap_bn, short[0].weight, short[1],
                              short[2].weight, short[3], short[4].weight, short[5], self.oup, relu=relu,
                              upsample=self.upsample, training=training, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, oup={self.oup}, backend={self.backend!r}"


def depthwise_bn_reason(conv: nn.Module, bn: nn.Module) -> str | None:
    """Why ``ghostfused.ops.depthwise_bn`` cannot compute ``bn(conv(x))`` (None when it can)."""
    if not isinstance(conv, nn.Conv2d) or conv.bias is not None:
        return "the convolution must be an nn.Conv2d without bias"
    k, stride = conv.kernel_size[0], conv.stride[0]
    if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (stride, stride) or conv.dilation != (1, 1)
            or conv.padding != (k // 2, k // 2) or conv.padding_mode != "zeros"
            or not conv.groups == conv.in_channels == conv.out_channels):
        return "the convolution must be depthwise with an odd square kernel k, padding k // 2, one stride, no dilation"
    if not is_fusable(bn) or bn.num_features != conv.out_channels:
        return "the BatchNorm must be an affine nn.BatchNorm2d (or SyncBatchNorm) of the convolution's channels"
    return None


# Eval outputs of fewer values per plane than this run the layers: the cpu kernel works one plane at a time, and on
# GhostNetV2's 7x7 outputs (14x14 inputs at stride 2) oneDNN's channel-blocked convolution was faster at batch 8
# (benchmarks/cpu_ops.py --depthwise, benchmarks/results/cpu-20261205-184641: the kernel at 0.53x for 672 channels,
# 0.88x for 112), level or behind at batch 1.
_EVAL_KERNEL_MIN_PLANE = 64


def depthwise_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor, backend: str) -> Tensor:
    """``bn(conv(x))`` for a pair that :func:`depthwise_bn_reason` accepts: ``ghostfused.ops.depthwise_bn`` where
    the backend has a kernel for it (``backends.KERNEL_OPS``; the ``cpu`` backend, NCHW inputs), else the layers
    themselves (cuDNN on GPUs and oneDNN in channels_last are fast; the op would only add its call cost), as in
    eval for small output planes (``_EVAL_KERNEL_MIN_PLANE``)."""
    resolved = backends.resolve(backend, x.device)
    if resolved == "eager" or "depthwise_bn" not in backends.KERNEL_OPS[resolved] \
            or reference.memory_format_of(x) == torch.channels_last:
        return bn(conv(x))
    if not bn.training:
        stride = conv.stride[0]
        if x.dim() == 4 and output_size(x.shape[2], stride) * output_size(x.shape[3], stride) < _EVAL_KERNEL_MIN_PLANE:
            return bn(conv(x))
        out = eval_kernel_output("depthwise_bn", resolved,
                                 (x, _weight(conv), *module_schema_lists([bn]), conv.stride[0], False, None))
        if out is not None:
            return out
    return ops.depthwise_bn(x, conv.weight, bn, conv.stride[0], training=bn.training, backend=resolved)


class DepthwiseBNSequential(nn.Sequential):
    """An ``nn.Sequential`` whose (depthwise convolution, BatchNorm) pairs run as one op (:func:`depthwise_bn`),
    such as GhostNetV2's shortcut ``Sequential(dwconv, BN, conv1x1, BN)``; its other (convolution, BatchNorm) pairs
    run through :func:`conv_bn` (one folded convolution in eval). Same children, so the same state dict.
    ``[N, C, H, W] -> `` whatever the layers give."""

    @classmethod
    def from_module(cls, module: nn.Sequential, backend: str = "auto") -> "DepthwiseBNSequential":
        """A fused Sequential sharing ``module``'s children; ValueError when it holds no pair to fuse."""
        fused = cls(*module._modules.values())
        fused.training = module.training
        fused.backend = backends.check_name(backend)
        layers = list(module._modules.values())
        fused.pairs = tuple(i for i in range(len(layers) - 1) if depthwise_bn_reason(layers[i], layers[i + 1]) is None)
        if not fused.pairs:
            raise ValueError("the Sequential holds no (depthwise convolution, BatchNorm) pair")
        return fused

    def forward(self, x: Tensor) -> Tensor:
        layers = list(self._modules.values())
        i = 0
        while i < len(layers):
            if i in self.pairs:
                x = depthwise_bn(layers[i], layers[i + 1], x, self.backend)
                i += 2
            elif i + 1 < len(layers) and isinstance(layers[i], nn.Conv2d) and is_fusable(layers[i + 1]):
                x = conv_bn(layers[i], layers[i + 1], x)
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, backend={self.backend!r}"


def _sharing(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance with ``module``'s attributes (hooks and mode too) and its children, parameters and buffers,
    in containers of its own."""
    fused = cls.__new__(cls)
    fused.__dict__.update(module.__dict__)
    fused._modules = dict(module._modules)
    fused._parameters, fused._buffers = dict(module._parameters), dict(module._buffers)
    return fused


class SqueezeExcite(reference.SqueezeExcite):
    """:class:`ghostfused.reference.SqueezeExcite` with its two 1x1 convolutions, which see one pixel per sample (the
    pooled vector), computed as linear layers on [N, C]: one GEMM over the batch each, where ATen's convolution takes
    its unbatched slow path for one-pixel inputs (a few percent of a batch-8 forward or training step; at batch 1
    reading the weights bounds both). Same parameters, attributes and state dict. ``[N, C, H, W] -> [N, C, H, W]``,
    laid out like x."""

    @classmethod
    def from_module(cls, module: reference.SqueezeExcite) -> "SqueezeExcite":
        """A module sharing ``module``'s submodules (its convolutions' parameters)."""
        return _sharing(cls, module)

    def forward(self, x: Tensor) -> Tensor:
        reduce, expand = self.conv_reduce, self.conv_expand
        hidden = self.act1(F.linear(x.mean((2, 3)), reduce.weight.flatten(1), reduce.bias))
        scale = reference.hard_sigmoid(F.linear(hidden, expand.weight.flatten(1), expand.bias))
        return x * scale[:, :, None, None]


class GhostBottleneckV2(reference.GhostBottleneckV2):
    """:class:`ghostfused.reference.GhostBottleneckV2` with its layers fused (``backend`` as above): the two Ghost
    modules, the strided depthwise convolution and its BatchNorm (``conv_dw``, ``bn_dw``: :func:`depthwise_bn`) and
    the shortcut's (a :class:`DepthwiseBNSequential`). Same attributes and state dict."""

    ghost_module = GhostModuleV2

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backends.check_name(backend)
        self.ghost1.backend = self.ghost2.backend = self.backend
        if len(self.shortcut) > 0:
            self.shortcut = DepthwiseBNSequential.from_module(self.shortcut, self.backend)

    @classmethod
    def from_module(cls, module: reference.GhostBottleneckV2, backend: str = "auto") -> "GhostBottleneckV2":
        """A fused bottleneck sharing ``module``'s submodules (its Ghost modules and shortcut as they are: ``convert``
        fuses those)."""
        fused = _sharing(cls, module)
        fused.backend = backends.check_name(backend)
        return fused

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        x = self.ghost1(x)
        if self.stride > 1 and depthwise_bn_reason(self.conv_dw, self.bn_dw) is None:
            x = depthwise_bn(self.conv_dw, self.bn_dw, x, self.backend)
        elif self.stride > 1:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        shortcut = self.shortcut(residual)
        if ((torch.is_grad_enabled() and (x.requires_grad or shortcut.requires_grad)) or x.shape != shortcut.shape
                or x.dtype != shortcut.dtype):
            return x + shortcut
        # No graph to record: the sum goes into ghost2's fresh output instead of a new tensor (one large allocation,
        # whose pages the kernel maps anew at each call on CPUs, saved per bottleneck).
        return x.add_(shortcut)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def conv_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(conv(x))``; in eval mode one convolution with the BatchNorm folded into its weight and bias, which saves
    the BatchNorm's pass over the output (the folded weight is computed at each call: nothing goes stale).
    ``[N, Cin, H, W] -> [N, Cout, H', W']``, any float dtype, laid out as the convolution lays it out."""
    if bn.training or not is_fusable(bn) or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return bn(conv(x))
    scale, shift = reference.batch_norm_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    bias = shift if conv.bias is None else shift + conv.bias * scale
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


class ConvBnAct(reference.ConvBnAct):
    """:class:`ghostfused.reference.ConvBnAct` with its BatchNorm folded into the convolution in eval mode
    (:func:`conv_bn`). Same attributes and state dict. ``[N, in_chs, H, W] -> [N, out_chs, H', W']``."""

    @classmethod
    def from_module(cls, module: reference.ConvBnAct) -> "ConvBnAct":
        """A module sharing ``module``'s submodules."""
        return _sharing(cls, module)

    def forward(self, x: Tensor) -> Tensor:
        return self.act1(conv_bn(self.conv, self.bn1, x))


class GhostNetV2(reference.GhostNetV2):
    """:class:`ghostfused.reference.GhostNetV2` whose stem runs in eval mode as one kernel of its ``backend``
    (``ghostfused.ops.stem``) or else folds its BatchNorm into the convolution (:func:`conv_bn`), and whose
    ``conv_head``, a 1x1 convolution of the pooled vector, runs as a linear layer (ATen's convolution takes its
    unbatched slow path for one-pixel inputs). ``convert`` gives our GhostNetV2 models this class in place and sets
    ``backend`` (the subclass adds no state). ``[N, 3, H, W] -> [N, num_classes]``."""

    backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        stem = stem_kernel_output(self.conv_stem, self.bn1, self.act1, x, self.backend)
        if stem is None:
            stem = self.act1(conv_bn(self.conv_stem, self.bn1, x))
        x = self.global_pool(self.blocks(stem))
        head = self.conv_head
        if (x.shape[-2:] == (1, 1) and type(head) is nn.Conv2d and head.kernel_size == (1, 1) and head.groups == 1
                and head.padding == (0, 0)):
            x = self.act2(F.linear(x.flatten(1), head.weight.flatten(1), head.bias))
        else:
            x = self.act2(head(x)).flatten(1)
        if self.dropout > 0:
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)
