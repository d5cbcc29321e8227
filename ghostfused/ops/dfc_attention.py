"""``ghostfused::dfc_attention``: the DFC attention path of GhostNetV2 as one op (SPEC 2.1).

``out = features * upsample(sigmoid(BN2(vconv(BN1(hconv(BN0(conv1x1(avg_pool2x2(x)))))))))``: downsample,
1x1 convolution, horizontal (1, K) and vertical (K, 1) depthwise convolutions, sigmoid, upsample and multiply,
with one autograd node. The gate lives at quarter resolution only.
"""

import torch
from torch import Tensor

from ..reference import memory_format_of
from . import checks
from .define import call_fused_op, define_fused_op

ARGUMENTS = ("Tensor x, Tensor features, Tensor conv_weight, Tensor horizontal_weight, Tensor vertical_weight, "
             "Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, float[] bn_eps, "
             "str upsample, bool training, str? sync_group")


def _fake_output(x, features, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var,
                 bn_eps, upsample, training, sync_group):
    out = torch.empty_like(features, memory_format=memory_format_of(x))
    return out, 3 * conv_weight.shape[0], 0


def check_features(features, x: Tensor, channels: int) -> None:
    """``features`` is [N, channels, H, W] with x's N, H, W, dtype and device."""
    checks.check_input(features, "features")
    if features.dtype != x.dtype:
        raise TypeError(f"features must have x's dtype {x.dtype}, got {features.dtype}")
    if features.device != x.device:
        raise ValueError(f"features is on {features.device} but x is on {x.device}")
    expected = (x.shape[0], channels, x.shape[2], x.shape[3])
    if tuple(features.shape) != expected:
        raise ValueError(f"features must have shape {expected} (x's N, H, W and conv_weight's channels), "
                         f"got {tuple(features.shape)}")


BN_NAMES = ("conv_bn", "horizontal_bn", "vertical_bn")


def check_arguments(x, features, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var,
                    bn_eps, upsample, training, sync_group, bn_names=None) -> tuple[int, int, int, int]:
    """Validate the op's arguments (SPEC section 5; ``bn_names`` as in ``checks.check_batch_norms``); returns the
    output's shape."""
    checks.check_input(x)
    checks.check_attn_size(x)
    checks.check_tensor(conv_weight, "conv_weight")
    if conv_weight.dim() != 4:
        raise ValueError(f"conv_weight must be a 4-D tensor [C, Cin, 1, 1], got shape {tuple(conv_weight.shape)}")
    channels = conv_weight.shape[0]
    check_features(features, x, channels)
    checks.check_dfc_weights(conv_weight, horizontal_weight, vertical_weight, x, channels)
    checks.check_upsample(upsample)
    checks.check_batch_norms(x, (channels,) * 3, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_names)
    checks.check_training_count(x.shape[0] * (x.shape[2] // 2) * (x.shape[3] // 2), "x (after 2x2 pooling)",
                                training and sync_group is None)
    return (x.shape[0], channels, x.shape[2], x.shape[3])


dfc_attention_op = define_fused_op("dfc_attention", ARGUMENTS, num_tensors=5, fake_output=_fake_output,
                                   check_arguments=check_arguments)


def dfc_attention(x: Tensor, features: Tensor, conv_weight: Tensor, conv_bn, horizontal_weight: Tensor,
                  horizontal_bn, vertical_weight: Tensor, vertical_bn, *, upsample: str = "nearest",
                  training: bool = False, backend: str = "auto") -> Tensor:
    """``features`` times the DFC attention gate computed from ``x``, as one fused op.

    Under ``torch.autocast``, x, features and the convolution weights are cast to the autocast dtype (as eager
    autocast casts a convolution's arguments); BatchNorm tensors stay as they are (see ``ghostfused.ops.autocast``).

    Args:
        x: [N, Cin, H, W] with H, W >= 2, float16 / bfloat16 / float32 / float64, contiguous or channels_last.
        features: [N, C, H, W], x's dtype: the tensor the gate multiplies (a Ghost module's output).
        conv_weight: [C, Cin, 1, 1]; horizontal_weight: [C, 1, 1, K]; vertical_weight: [C, 1, K, 1], K odd;
            all in x's dtype.
        conv_bn, horizontal_bn, vertical_bn: ``nn.BatchNorm2d`` (or ``ghostfused.ops.BatchNorm``) of C channels,
            running statistics updated in place in training (batch statistics over the whole process group when they
            are ``nn.SyncBatchNorm`` modules that synchronise).
        upsample: 'nearest' (PyTorch's legacy nearest, as the official model) or 'bilinear' (align_corners=False).
        training: batch statistics (and running updates) or running statistics.
        backend: 'auto', 'eager', 'triton', 'cpu' or 'cuda'.

    Returns:
        [N, C, H, W] in x's dtype, laid out like x.
    """
    return call_fused_op(dfc_attention_op, (x, features, conv_weight, horizontal_weight, vertical_weight),
                         (conv_bn, horizontal_bn, vertical_bn), BN_NAMES, (upsample,), training, backend,
                         lambda x: [x.shape[0] * (x.shape[2] // 2) * (x.shape[3] // 2)] * 3)
