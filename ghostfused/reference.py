"""The eager truth: GhostNetV2 exactly as SPEC section 1 defines it, written with plain PyTorch layers.

Two halves:

* Modules (``GhostModuleV2``, ``SqueezeExcite``, ``ConvBnAct``, ``GhostBottleneckV2``, ``GhostNetV2``) with the
  official attribute names, so their state dicts use the official key layout
  (``blocks.2.0.ghost1.short_conv.2.weight``).
* Functional forms of the fused operations (``ghost_concat``, ``dfc_attention``, ``ghost_attn``, and
  ``depthwise_bn`` for the bottleneck's strided depthwise layers) with the same arguments as the ``ghostfused::`` ops. They are the ``eager`` backend, and every other backend is tested against them.

BatchNorm arguments of the functional forms come as lists, one entry per BatchNorm in the order the operation applies
them: ``bn_weight``, ``bn_bias`` (affine parameters), ``bn_mean``, ``bn_var`` (running statistics, used in eval mode
only) and ``bn_eps``. Each functional form returns ``(out, stats_mean, stats_var)``: the statistics every BatchNorm
normalised with, concatenated over the BatchNorms (batch mean and biased batch variance in training, the running
statistics in eval), in float32 (float64 for float64 inputs). The last argument, ``sync_group`` (None by default), names
a ``torch.distributed`` process group whose whole batch the BatchNorms normalise over in training, as
``nn.SyncBatchNorm`` does (``ghostfused.distributed``); the statistics returned are then the group's.
"""

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import distributed

UPSAMPLE_MODES = ("nearest", "bilinear")


def make_divisible(value: float, divisor: int = 4, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% below it (the official channel rounding)."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def hard_sigmoid(x: Tensor) -> Tensor:
    """``relu6(x + 3) / 6``, the SqueezeExcite gate of GhostNet."""
    return F.relu6(x + 3.0) / 6.0


def _activation(relu: bool) -> nn.Module:
    return nn.ReLU(inplace=True) if relu else nn.Identity()


class GhostModuleV2(nn.Module):
    """Ghost module: ``primary_conv`` + ``cheap_operation`` concatenated, times the DFC gate in 'attn' mode.

    Args:
        inp, oup: input and output channels.
        kernel_size, stride: of the primary (and, in 'attn' mode, the first short) convolution.
        ratio: ``init = ceil(oup / ratio)`` primary channels, ``init * (ratio - 1)`` cheap channels.
        dw_size: kernel size of the cheap depthwise convolution.
        relu: ReLU after both BatchNorms of the Ghost branches.
        mode: 'original' (GhostNetV1) or 'attn' (with the DFC attention of GhostNetV2).
        dfc_kernel_size: K of the horizontal (1, K) and vertical (K, 1) depthwise convolutions (odd).
        upsample: 'nearest' (official) or 'bilinear' (align_corners=False) for the gate.

    Shapes: ``[N, inp, H, W] -> [N, oup, H / stride, W / stride]``; 'attn' mode needs H, W >= 2.
    """

    def __init__(self, inp: int, oup: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3,
                 stride: int = 1, relu: bool = True, mode: str = "original", dfc_kernel_size: int = 5,
                 upsample: str = "nearest"):
        super().__init__()
        if mode not in ("original", "attn"):
            raise ValueError(f"mode must be 'original' or 'attn', got {mode!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if dfc_kernel_size % 2 == 0 or dfc_kernel_size < 1:
            raise ValueError(f"dfc_kernel_size must be a positive odd number, got {dfc_kernel_size}")
        self.mode = mode
        self.oup = oup
        self.upsample = upsample
        self.gate_fn = nn.Sigmoid()
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            _activation(relu),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels),
            _activation(relu),
        )
        if mode == "attn":
            k = dfc_kernel_size
            self.short_conv = nn.Sequential(
                nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
                nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, kernel_size=(1, k), stride=1, padding=(0, k // 2), groups=oup, bias=False),
                nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, kernel_size=(k, 1), stride=1, padding=(k // 2, 0), groups=oup, bias=False),
                nn.BatchNorm2d(oup),
            )

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)[:, : self.oup]
        if self.mode == "original":
            return out
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        return out * _upsample(self.gate_fn(res), out.shape[-2:], self.upsample)


def _upsample(gate: Tensor, size, mode: str) -> Tensor:
    if mode == "nearest":
        return F.interpolate(gate, size=tuple(size), mode="nearest")
    return F.interpolate(gate, size=tuple(size), mode="bilinear", align_corners=False)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with a hard-sigmoid gate; ``[N, C, H, W] -> [N, C, H, W]``."""

    def __init__(self, in_chs: int, se_ratio: float = 0.25, divisor: int = 4):
        super().__init__()
        reduced_chs = make_divisible(in_chs * se_ratio, divisor)
        self.conv_reduce = nn.Conv2d(in_chs, reduced_chs, 1, bias=True)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced_chs, in_chs, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * hard_sigmoid(scale)


class ConvBnAct(nn.Module):
    """Convolution, BatchNorm, ReLU (``conv``, ``bn1``, ``act1``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostBottleneckV2(nn.Module):
    """GhostNetV2 bottleneck: ghost1 ('original' for ``layer_id <= 1``, else 'attn'), optional strided depthwise
    and SqueezeExcite, ghost2, plus the shortcut. ``[N, in_chs, H, W] -> [N, out_chs, H / stride, W / stride]``."""

    ghost_module = GhostModuleV2

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0, layer_id: int = 0, dfc_kernel_size: int = 5, upsample: str = "nearest"):
        super().__init__()
        self.stride = stride
        mode = "original" if layer_id <= 1 else "attn"
        self.ghost1 = self.ghost_module(in_chs, mid_chs, relu=True, mode=mode,
                                        dfc_kernel_size=dfc_kernel_size, upsample=upsample)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride,
                                     padding=(dw_kernel_size - 1) // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, se_ratio=se_ratio) if se_ratio > 0 else None
        self.ghost2 = self.ghost_module(mid_chs, out_chs, relu=False, mode="original")
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride=stride, padding=(dw_kernel_size - 1) // 2,
                          groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        x = self.ghost1(x)
        if self.stride > 1:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        return x + self.shortcut(residual)


# (dw_kernel_size, expansion, out_channels, se_ratio, stride) of the 16 bottlenecks, grouped in 9 stages.
GHOSTNETV2_STAGES = (
    ((3, 16, 16, 0, 1),),
    ((3, 48, 24, 0, 2),),
    ((3, 72, 24, 0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0, 2),),
    ((3, 200, 80, 0, 1), (3, 184, 80, 0, 1), (3, 184, 80, 0, 1), (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0, 1), (5, 960, 160, 0.25, 1)),
)


class GhostNetV2(nn.Module):
    """GhostNetV2 (arXiv 2211.12905). ``[N, 3, H, W]`` images -> ``[N, num_classes]`` logits."""

    bottleneck = GhostBottleneckV2

    def __init__(self, width: float = 1.0, num_classes: int = 1000, dropout: float = 0.2,
                 dfc_kernel_size: int = 5, upsample: str = "nearest"):
        super().__init__()
        self.dropout = dropout
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(3, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        in_chs = stem_chs
        layer_id = 0
        stages = []
        for stage in GHOSTNETV2_STAGES:
            layers = []
            for k, expansion, channels, se_ratio, stride in stage:
                out_chs = make_divisible(channels * width, 4)
                mid_chs = make_divisible(expansion * width, 4)
                layers.append(self.bottleneck(in_chs, mid_chs, out_chs, k, stride, se_ratio=se_ratio,
                                              layer_id=layer_id, dfc_kernel_size=dfc_kernel_size,
                                              upsample=upsample))
                in_chs = out_chs
                layer_id += 1
            stages.append(nn.Sequential(*layers))
        out_chs = make_divisible(960 * width, 4)
        stages.append(nn.Sequential(ConvBnAct(in_chs, out_chs, 1)))
        self.blocks = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.conv_head = nn.Conv2d(out_chs, 1280, 1, 1, 0, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x))).flatten(1)
        if self.dropout > 0:
            x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)


# ----------------------------------------------------------------------------------------------------------------
# Functional forms of the fused operations (the `eager` backend).


def stats_dtype(x: Tensor) -> torch.dtype:
    """Dtype of BatchNorm statistics for input ``x``: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def batch_norm_affine(weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The per-channel ``(scale, shift)`` of a BatchNorm with statistics ``mean``, ``var`` [C]:
    ``y = x * scale + shift``."""
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


def _batch_norm(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
                training: bool, sync_group: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm as ``nn.BatchNorm2d`` computes it (``nn.SyncBatchNorm`` over the process group named
    ``sync_group`` in training, when given); returns ``(y, mean, var)`` of the statistics it used."""
    acc = stats_dtype(x)
    if training and sync_group is not None:
        if x.numel() == 0:  # nothing to add to the group's sums, but x's backward must take part in the reductions
            local_mean = x.to(acc).sum(dim=(0, 2, 3))
            local_var = local_mean + 1
        else:
            local_var, local_mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
        group_mean, group_var = distributed.group_moments(local_mean, local_var, x.numel() // x.shape[1],
                                                          sync_group)
        scale, shift = batch_norm_affine(weight.to(acc), bias.to(acc), group_mean.to(acc), group_var.to(acc), eps)
        y = (x.to(acc) * scale[:, None, None] + shift[:, None, None]).to(x.dtype)
        return y, group_mean.detach().to(acc), group_var.detach().to(acc)
    if training:
        y = F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
        with torch.no_grad():
            if x.numel() == 0:  # an empty batch has no statistics; they are never used
                mean_used, var_used = x.new_zeros(x.shape[1], dtype=acc), x.new_ones(x.shape[1], dtype=acc)
            else:
                var_used, mean_used = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
    else:
        # The statistics in the weight's dtype: a backward receives the saved ones in the stats dtype (float32 for
        # float16 x), which F.batch_norm refuses beside float16 parameters.
        y = F.batch_norm(x, mean.to(weight.dtype), var.to(weight.dtype), weight, bias, training=False, eps=eps)
        mean_used, var_used = mean.detach().to(acc), var.detach().to(acc)
    return y, mean_used, var_used


def _ghost_branches(x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu,
                    training, sync_group):
    act = F.relu if relu else (lambda t: t)
    x1, m1, v1 = _batch_norm(F.conv2d(x, primary_weight), bn_weight[0], bn_bias[0], bn_mean[0], bn_var[0],
                             bn_eps[0], training, sync_group)
    x1 = act(x1)
    dw = cheap_weight.shape[-1]
    x2, m2, v2 = _batch_norm(F.conv2d(x1, cheap_weight, padding=dw // 2, groups=primary_weight.shape[0]),
                             bn_weight[1], bn_bias[1], bn_mean[1], bn_var[1], bn_eps[1], training, sync_group)
    x2 = act(x2)
    out = torch.cat([x1, x2], dim=1)[:, :oup]
    return out, [m1, m2], [v1, v2]


def _dfc_gate(x, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps,
              size, upsample, training, sync_group):
    """The DFC gate at full resolution ``size``, and the statistics of its three BatchNorms."""
    k = horizontal_weight.shape[-1]
    channels = conv_weight.shape[0]
    z = F.conv2d(F.avg_pool2d(x, kernel_size=2, stride=2), conv_weight)
    means, variances = [], []
    for i, (weight, padding) in enumerate(((None, 0), (horizontal_weight, (0, k // 2)),
                                           (vertical_weight, (k // 2, 0)))):
        if weight is not None:
            z = F.conv2d(z, weight, padding=padding, groups=channels)
        z, m, v = _batch_norm(z, bn_weight[i], bn_bias[i], bn_mean[i], bn_var[i], bn_eps[i], training, sync_group)
        means.append(m)
        variances.append(v)
    return _upsample(torch.sigmoid(z), size, upsample), means, variances


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout every fused op writes for input ``x``: channels_last when x is, contiguous otherwise."""
    channels_last = x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _dense(t: Tensor, like: Tensor) -> Tensor:
    return t.contiguous(memory_format=memory_format_of(like))


def ghost_concat(x: Tensor, primary_weight: Tensor, cheap_weight: Tensor, bn_weight: Sequence[Tensor],
                 bn_bias: Sequence[Tensor], bn_mean: Sequence[Tensor], bn_var: Sequence[Tensor],
                 bn_eps: Sequence[float], oup: int, relu: bool, training: bool,
                 sync_group: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost module, 'original' mode: ``cat(act(BN0(conv1x1(x))), act(BN1(dwconv(.))))[:, :oup]``.

    x: [N, Cin, H, W]; primary_weight: [init, Cin, 1, 1]; cheap_weight: [new, 1, dw, dw] (groups=init).
    BatchNorm lists hold two entries (primary, cheap). Returns ``out`` [N, oup, H, W] in x's dtype, and the
    statistics ``[init + new]`` (see the module docstring).
    """
    out, means, variances = _ghost_branches(x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var,
                                            bn_eps, oup, relu, training, sync_group)
    return _dense(out, x), torch.cat(means), torch.cat(variances)


def dfc_attention(x: Tensor, features: Tensor, conv_weight: Tensor, horizontal_weight: Tensor,
                  vertical_weight: Tensor, bn_weight: Sequence[Tensor], bn_bias: Sequence[Tensor],
                  bn_mean: Sequence[Tensor], bn_var: Sequence[Tensor], bn_eps: Sequence[float], upsample: str,
                  training: bool, sync_group: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DFC attention: ``features * upsample(sigmoid(BN2(vconv(BN1(hconv(BN0(conv1x1(avg_pool2x2(x)))))))))``.

    x: [N, Cin, H, W] (H, W >= 2); features: [N, C, H, W]; conv_weight: [C, Cin, 1, 1];
    horizontal_weight: [C, 1, 1, K]; vertical_weight: [C, 1, K, 1]. BatchNorm lists hold three entries.
    Returns ``out`` [N, C, H, W] in features' dtype, laid out like x, and the statistics ``[3 C]``.
    """
    gate, means, variances = _dfc_gate(x, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias,
                                       bn_mean, bn_var, bn_eps, features.shape[-2:], upsample, training,
                                       sync_group)
    return _dense(features * gate, x), torch.cat(means), torch.cat(variances)


def ghost_attn(x: Tensor, primary_weight: Tensor, cheap_weight: Tensor, conv_weight: Tensor,
               horizontal_weight: Tensor, vertical_weight: Tensor, bn_weight: Sequence[Tensor],
               bn_bias: Sequence[Tensor], bn_mean: Sequence[Tensor], bn_var: Sequence[Tensor],
               bn_eps: Sequence[float], oup: int, relu: bool, upsample: str, training: bool,
               sync_group: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost module, 'attn' mode: ``ghost_concat`` times the DFC gate (``dfc_attention``), one operation.

    BatchNorm lists hold five entries (primary, cheap, short 0, short 1, short 2). Returns ``out`` [N, oup, H, W]
    and the statistics ``[init + new + 3 oup]``.
    """
    out, means, variances = _ghost_branches(x, primary_weight, cheap_weight, bn_weight[:2], bn_bias[:2],
                                            bn_mean[:2], bn_var[:2], bn_eps[:2], oup, relu, training, sync_group)
    gate, gate_means, gate_variances = _dfc_gate(x, conv_weight, horizontal_weight, vertical_weight, bn_weight[2:],
                                                 bn_bias[2:], bn_mean[2:], bn_var[2:], bn_eps[2:],
                                                 out.shape[-2:], upsample, training, sync_group)
    return _dense(out * gate, x), torch.cat(means + gate_means), torch.cat(variances + gate_variances)


def depthwise_bn(x: Tensor, weight: Tensor, bn_weight: Sequence[Tensor], bn_bias: Sequence[Tensor],
                 bn_mean: Sequence[Tensor], bn_var: Sequence[Tensor], bn_eps: Sequence[float], stride: int,
                 training: bool, sync_group: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A depthwise convolution and the BatchNorm after it: ``BN(dwconv(x, weight, stride, padding=k // 2))``, the
    bottleneck's ``bn_dw(conv_dw(x))`` and the first two layers of its shortcut.

    x: [N, C, H, W]; weight: [C, 1, k, k] (k odd, groups=C, no bias). BatchNorm lists hold one entry. Returns
    ``out`` [N, C, (H - 1) // stride + 1, (W - 1) // stride + 1] in x's dtype, laid out like x, and the statistics
    ``[C]``.
    """
    k = weight.shape[-1]
    z = F.conv2d(x, weight, stride=stride, padding=k // 2, groups=x.shape[1])
    out, mean, var = _batch_norm(z, bn_weight[0], bn_bias[0], bn_mean[0], bn_var[0], bn_eps[0], training, sync_group)
    return _dense(out, x), mean.clone(), var.clone()  # eval's statistics are the inputs, which an op may not return
