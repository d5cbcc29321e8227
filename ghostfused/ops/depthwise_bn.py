"""``ghostfused::depthwise_bn``: a depthwise convolution and the BatchNorm after it, as one op.

GhostNetV2's bottlenecks run ``bn_dw(conv_dw(x))`` (stride 2) and, in their shortcut, the same pair before a 1x1
convolution. On CPUs PyTorch's NCHW depthwise convolution is slow, its backward most of all: forward + backward of
these layers at batch 8 took 80 ms of a 330-415 ms eager training step in NCHW, against 23 ms in channels_last
(oneDNN). The ``cpu`` backend computes the pair in one op (``csrc/cpu/depthwise_bn.cpp``) for NCHW inputs; a
channels_last input runs the eager reference, whose oneDNN kernels are fast in that layout, so that no layout copy
is made. The GPU backends run the eager reference too (cuDNN), as declared in ``backends.KERNEL_OPS``.
"""

import torch
from torch import Tensor

from .. import backends
from ..reference import memory_format_of
from . import checks
from .autocast import cast_for_autocast
from .batch_norm import as_batch_norm, schema_lists, sync_group_name, training_counts, update_running_stats
from .define import define_fused_op, run_fused_op

ARGUMENTS = ("Tensor x, Tensor weight, Tensor[] bn_weight, Tensor[] bn_bias, Tensor[] bn_mean, Tensor[] bn_var, "
             "float[] bn_eps, int stride, bool training, str? sync_group")

BN_NAMES = ("bn",)


def output_size(size: int, stride: int) -> int:
    """Output length of an axis of ``size`` under an odd kernel with padding k // 2 and ``stride``."""
    return (size - 1) // stride + 1


def _fake_output(x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, training, sync_group):
    n, c, h, w = x.shape
    out = x.new_empty((n, c, output_size(h, stride), output_size(w, stride)))
    return out.contiguous(memory_format=memory_format_of(x)), c, 0


def check_arguments(x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, training, sync_group,
                    bn_names=None) -> tuple[int, int, int, int]:
    """Validate the op's arguments (SPEC section 5; ``bn_names`` as in ``checks.check_batch_norms``); returns the
    output's shape."""
    checks.check_input(x)
    checks.check_depthwise_weight(weight, x)
    checks.check_stride(stride)
    checks.check_batch_norms(x, (x.shape[1],), bn_weight, bn_bias, bn_mean, bn_var, bn_eps, bn_names)
    shape = (x.shape[0], x.shape[1], output_size(x.shape[2], stride), output_size(x.shape[3], stride))
    checks.check_training_count(shape[0] * shape[2] * shape[3], "the depthwise convolution's output",
                                training and sync_group is None)
    return shape


depthwise_bn_op = define_fused_op("depthwise_bn", ARGUMENTS, num_tensors=2, fake_output=_fake_output,
                                  check_arguments=check_arguments)


def depthwise_bn(x: Tensor, weight: Tensor, bn, stride: int = 1, *, training: bool = False,
                 backend: str = "auto") -> Tensor:
    """``bn(conv2d(x, weight, stride=stride, padding=k // 2, groups=C))`` as one fused op.

    Under ``torch.autocast``, x and the weight are cast to the autocast dtype (``ghostfused.ops.autocast``).

    Args:
        x: [N, C, H, W], float16 / bfloat16 / float32 / float64, contiguous or channels_last.
        weight: [C, 1, k, k], x's dtype, k odd (a depthwise convolution without bias).
        bn: an ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``, or ``ghostfused.ops.BatchNorm``) of C channels; its
            running statistics are updated in training.
        stride: of the convolution (GhostNetV2 uses 1 and 2).
        training: normalise with batch statistics and update the running ones (else use the running ones).
        backend: 'auto', 'eager', 'triton', 'cpu' or 'cuda'.

    Returns:
        [N, C, (H - 1) // stride + 1, (W - 1) // stride + 1] in x's dtype, laid out like x.
    """
    checks.check_input(x)
    x, weight = cast_for_autocast(x, weight)
    state = as_batch_norm(bn, BN_NAMES[0])
    group = sync_group_name((bn,), BN_NAMES) if training else None
    shape = check_arguments(x, weight, *schema_lists([state]), stride, training, group, bn_names=BN_NAMES)
    checks.check_momentum(state, BN_NAMES[0])
    counts = training_counts([shape[0] * shape[2] * shape[3]], group, x.device) if training else None
    resolved = backends.resolve(backend, x.device)
    if resolved == "cpu" and memory_format_of(x) == torch.channels_last:
        resolved = "eager"  # oneDNN's own channels_last kernels: fast, and no layout copy
    out, stats_mean, stats_var, _ = run_fused_op(depthwise_bn_op, x, weight, *schema_lists([state]), stride,
                                                 bool(training), group, resolved)
    if training:
        update_running_stats([state], stats_mean, stats_var, counts)
    return out
