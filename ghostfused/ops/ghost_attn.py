"""``ghostfused::ghost_attn``: a whole 'attn' Ghost module (SPEC 2.3) as one op.

``out = ghost_concat(x) * upsample(dfc_gate(x))``: the primary and cheap branches and the DFC attention, with the
multiply by the upsampled gate inside the single write of the full-resolution output.
"""

from torch import Tensor

from ..reference import memory_format_of
from . import checks
from .define import call_fused_op, define_fused_op

ARGUMENTS = ("Tensor x, Tensor primary_weight, Tensor cheap_weight, Tensor conv_weight, Tensor horizontal_weight, "
             "Tensor vertical_weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, "
             "float[] bn_eps, int oup, bool relu, str upsample, bool training, str? sync_group")

BN_NAMES = ("primary_bn", "cheap_bn", "conv_bn", "horizontal_bn", "vertical_bn")


def _fake_output(x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias,
                 bn_mean, bn_var, bn_eps, oup, relu, upsample, training, sync_group):
    n, _, h, w = x.shape
    out = x.new_empty((n, oup, h, w)).contiguous(memory_format=memory_format_of(x))
    return out, primary_weight.shape[0] + cheap_weight.shape[0] + 3 * oup, n * primary_weight.shape[0] * h * w


def check_arguments(x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight,
                    bn_bias, bn_mean, bn_var, bn_eps, oup, relu, upsample, training, sync_group,
                    bn_names=None) -> tuple[int, int, int, int]:
    """Validate the op's arguments (SPEC section 5; ``bn_names`` as in ``checks.check_batch_norms``); returns the
    output's shape."""
    checks.check_input(x)
    checks.check_attn_size(x)
    init, new = checks.check_ghost_weights(primary_weight, cheap_weight, x)
    checks.check_oup(oup, init, new)
    checks.check_dfc_weights(conv_weight, horizontal_weight, vertical_weight, x, oup)
    checks.check_upsample(upsample)
    checks.check_batch_norms(x, (init, new, oup, oup, oup), bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_names)
    checks.check_training_count(x.shape[0] * (x.shape[2] // 2) * (x.shape[3] // 2), "x (after 2x2 pooling)",
                                training and sync_group is None)
    return (x.shape[0], oup, x.shape[2], x.shape[3])


ghost_attn_op = define_fused_op("ghost_attn", ARGUMENTS, num_tensors=6, fake_output=_fake_output,
                                check_arguments=check_arguments)


def _counts(x: Tensor) -> list[int]:
    """Values per channel of each BatchNorm: full resolution for the Ghost branches, quarter for the DFC branch."""
    count, pooled_count = x.shape[0] * x.shape[2] * x.shape[3], x.shape[0] * (x.shape[2] // 2) * (x.shape[3] // 2)
    return [count, count] + [pooled_count] * 3


def ghost_attn(x: Tensor, primary_weight: Tensor, primary_bn, cheap_weight: Tensor, cheap_bn, conv_weight: Tensor,
               conv_bn, horizontal_weight: Tensor, horizontal_bn, vertical_weight: Tensor, vertical_bn, oup: int, *,
               relu: bool = True, upsample: str = "nearest", training: bool = False,
               backend: str = "auto") -> Tensor:
    """The 'attn' Ghost module of GhostNetV2 as one fused op.

    Under ``torch.autocast``, x and the convolution weights are cast to the autocast dtype (as eager autocast casts a
    convolution's arguments); BatchNorm tensors stay as they are (see ``ghostfused.ops.autocast``).

    Args:
        x: [N, Cin, H, W] with H, W >= 2, float16 / bfloat16 / float32 / float64, contiguous or channels_last.
        primary_weight, primary_bn, cheap_weight, cheap_bn, oup, relu: as in :func:`ghost_concat`.
        conv_weight: [oup, Cin, 1, 1]; horizontal_weight: [oup, 1, 1, K]; vertical_weight: [oup, 1, K, 1], K odd;
            with conv_bn, horizontal_bn, vertical_bn of oup channels: the DFC branch (``short_conv``).
        upsample: 'nearest' or 'bilinear' (align_corners=False).
        training: batch statistics (and running updates of all five BatchNorms) or running statistics; the batch is
            the whole process group's when the BatchNorms are ``nn.SyncBatchNorm`` modules that synchronise.
        backend: 'auto', 'eager', 'triton', 'cpu' or 'cuda'.

    Returns:
        [N, oup, H, W] in x's dtype, laid out like x.
    """
    return call_fused_op(ghost_attn_op, (x, primary_weight, cheap_weight, conv_weight, horizontal_weight,
                                         vertical_weight),
                         (primary_bn, cheap_bn, conv_bn, horizontal_bn, vertical_bn), BN_NAMES,
                         (oup, bool(relu), upsample), training, backend, _counts)
