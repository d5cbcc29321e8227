"""``ghostfused::ghost_concat``: the Ghost module's primary and cheap convolutions and their concat (SPEC 2.2).

``out = cat([act(BN0(conv1x1(x))), act(BN1(depthwise(x1)))], dim=1)[:, :oup]`` as one op with one autograd node;
every backend writes both branches straight into their channel ranges of one output.
"""

from torch import Tensor

from ..reference import memory_format_of
from . import checks
from .define import call_fused_op, define_fused_op

ARGUMENTS = ("Tensor x, Tensor primary_weight, Tensor cheap_weight, Tensor[] bn_weight, Tensor[] bn_bias, "
             "Tensor[] bn_mean, Tensor[] bn_var, float[] bn_eps, int oup, bool relu, bool training, str? sync_group")


def _fake_output(x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu, training,
                 sync_group):
    n, _, h, w = x.shape
    out = x.new_empty((n, oup, h, w)).contiguous(memory_format=memory_format_of(x))
    return out, primary_weight.shape[0] + cheap_weight.shape[0], n * primary_weight.shape[0] * h * w


BN_NAMES = ("primary_bn", "cheap_bn")


def check_arguments(x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu, training,
                    sync_group, bn_names=None) -> tuple[int, int, int, int]:
    """Validate the op's arguments (SPEC section 5; ``bn_names`` as in ``checks.check_batch_norms``); returns the
    output's shape."""
    checks.check_input(x)
    init, new = checks.check_ghost_weights(primary_weight, cheap_weight, x)
    checks.check_oup(oup, init, new)
    checks.check_batch_norms(x, (init, new), bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_names)
    checks.check_training_count(x.shape[0] * x.shape[2] * x.shape[3], "x", training and sync_group is None)
    return (x.shape[0], oup, x.shape[2], x.shape[3])


ghost_concat_op = define_fused_op("ghost_concat", ARGUMENTS, num_tensors=3, fake_output=_fake_output,
                                  check_arguments=check_arguments)


def ghost_concat(x: Tensor, primary_weight: Tensor, primary_bn, cheap_weight: Tensor, cheap_bn, oup: int, *,
                 relu: bool = True, training: bool = False, backend: str = "auto") -> Tensor:
    """The 'original' Ghost module as one fused op.

    Under ``torch.autocast``, x and the convolution weights are cast to the autocast dtype (as eager autocast casts a
    convolution's arguments); BatchNorm tensors stay as they are (see ``ghostfused.ops.autocast``).

    Args:
        x: [N, Cin, H, W], float16 / bfloat16 / float32 / float64, contiguous or channels_last.
        primary_weight: [init, Cin, 1, 1], x's dtype (the 1x1 primary convolution).
        primary_bn, cheap_bn: ``nn.BatchNorm2d`` modules (or ``ghostfused.ops.BatchNorm``) of init and new channels;
            parameters in x's dtype or float32. In training their running statistics are updated in place; when
            they are ``nn.SyncBatchNorm`` modules that synchronise (``batch_norm.sync_process_group``), the batch
            statistics are those of the whole process group's batch.
        cheap_weight: [new, 1, dw, dw], x's dtype (depthwise, ``groups=init``, new a multiple of init, dw odd).
        oup: output channels, ``init <= oup <= init + new``.
        relu: ReLU after both BatchNorms.
        training: normalise with batch statistics and update the running ones (else use the running ones).
        backend: 'auto', 'eager', 'triton', 'cpu' or 'cuda'.

    Returns:
        [N, oup, H, W] in x's dtype, laid out like x.
    """
    return call_fused_op(ghost_concat_op, (x, primary_weight, cheap_weight), (primary_bn, cheap_bn), BN_NAMES,
                         (oup, bool(relu)), training, backend, lambda x: [x.shape[0] * x.shape[2] * x.shape[3]] * 2)
