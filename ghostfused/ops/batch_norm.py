"""BatchNorm state as the fused ops take it, and the op that updates running statistics.

The fused ops are functional (PyTorch allows an autograd formula only on a functional op): they return the batch
statistics they normalised with, and ``ghostfused::batch_norm_update_stats`` then applies the ``nn.BatchNorm2d``
running-statistics update, declaring its mutation in its schema so that ``torch.compile`` functionalizes it.
"""

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .. import distributed
from .direct import unobserved


class BatchNorm(NamedTuple):
    """The state of one ``nn.BatchNorm2d``: affine parameters [C], running statistics [C], the batch counter,
    ``momentum`` (None: cumulative average) and ``eps``."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    momentum: Optional[float]
    eps: float

    @classmethod
    def of(cls, module: nn.BatchNorm2d) -> "BatchNorm":
        """The state of ``module``, sharing its tensors (updates land in the module's buffers)."""
        parameters, buffers = module._parameters, module._buffers  # direct: nn.Module.__getattr__ is slow
        return cls(parameters["weight"], parameters["bias"], buffers["running_mean"], buffers["running_var"],
                   buffers["num_batches_tracked"], module.momentum, module.eps)


def is_fusable(module: nn.Module) -> bool:
    """Whether the fused ops reproduce ``module``: an affine ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``, which
    computes as BatchNorm2d unless :func:`sync_process_group` says otherwise) that tracks running statistics."""
    if not (isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and module.affine and module.track_running_stats):
        return False
    buffers = module._buffers  # direct: nn.Module.__getattr__ is slow, and this runs at every call of a fused layer
    return buffers.get("running_mean") is not None and buffers.get("num_batches_tracked") is not None


def sync_process_group(module: nn.Module):
    """The process group whose batch ``module`` normalises over now, or None when it normalises over the local batch.

    Not None only for an ``nn.SyncBatchNorm`` in training while ``torch.distributed`` is initialised and the module's
    process group (the default group when it has none) holds more than one process: the rule of
    ``nn.SyncBatchNorm.forward``. Otherwise SyncBatchNorm computes exactly as BatchNorm2d.
    """
    if not (isinstance(module, nn.SyncBatchNorm) and module.training and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        return None
    group = module.process_group or torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


def as_batch_norm(value, name: str) -> BatchNorm:
    """Accept an ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``) or a :class:`BatchNorm`; anything else is a TypeError
    (or ValueError) naming ``name``."""
    if isinstance(value, BatchNorm):
        return value
    if isinstance(value, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if not is_fusable(value):
            raise ValueError(f"{name}: the fused ops need an affine BatchNorm2d that tracks running statistics")
        return BatchNorm.of(value)
    raise TypeError(f"{name} must be an nn.BatchNorm2d or ghostfused.ops.BatchNorm, got {type(value).__name__}")


def sync_group_name(modules: Sequence, names: Sequence[str]) -> Optional[str]:
    """The name of the process group over whose whole batch an op's BatchNorms normalise (see
    :func:`sync_process_group`), or None when each normalises over the local batch.

    modules: the op's BatchNorm arguments (modules or :class:`BatchNorm` states, which never synchronise), named
    ``names``. One op normalises all its BatchNorms alike: a ValueError names the first that differs.
    """
    groups = [sync_process_group(m) if isinstance(m, nn.Module) else None for m in modules]
    for group, name in zip(groups[1:], names[1:]):
        if group is not groups[0]:
            raise ValueError(f"{name} synchronises over a different process group than {names[0]} (or only one of "
                             "them synchronises): one fused op normalises all its BatchNorms over one batch")
    return None if groups[0] is None else groups[0].group_name


def training_counts(counts: Sequence[int], sync_group: Optional[str], device: torch.device) -> list[int]:
    """Values per channel of each BatchNorm over the batch it normalises: ``counts`` (this process's), summed over
    the process group ``sync_group`` when given (one all-reduce on ``device``), where none may be 1 (ValueError), as
    for ``nn.BatchNorm2d``."""
    if sync_group is None:
        return list(counts)
    totals = distributed.group_counts(list(counts), sync_group, device)
    if 1 in totals:
        raise ValueError("expected more than 1 value per channel over the process group when training, got 1")
    return totals


def _update_stats(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, batch_mean: Tensor,
                  batch_var: Tensor, count: int, momentum: Optional[float]) -> None:
    """The running-statistics update of ``nn.BatchNorm2d`` in training mode, in place.

    running_mean, running_var: [C] buffers (any float dtype); num_batches_tracked: [] int64, incremented;
    batch_mean, batch_var: [C], the batch mean and *biased* variance over ``count`` values per channel.
    ``momentum=None`` is the cumulative average ``1 / num_batches_tracked``. An empty batch (``count == 0``)
    only increments the counter, as ``nn.BatchNorm2d`` does.
    """
    num_batches_tracked.add_(1)
    if count == 0:
        return
    unbiased_var = batch_var * (count / (count - 1))
    if momentum is None:
        factor = 1.0 / num_batches_tracked.to(batch_mean.dtype)
        running_mean.copy_(running_mean * (1 - factor) + batch_mean * factor)
        running_var.copy_(running_var * (1 - factor) + unbiased_var * factor)
    else:  # the arithmetic of _update_stats_together, so that both give the same bits
        running_mean.copy_((running_mean * (1 - momentum)).add_(batch_mean, alpha=momentum))
        running_var.copy_((running_var * (1 - momentum)).add_(unbiased_var, alpha=momentum))


batch_norm_update_stats = torch.library.custom_op(
    "ghostfused::batch_norm_update_stats", _update_stats,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"))


@batch_norm_update_stats.register_fake
def _(running_mean, running_var, num_batches_tracked, batch_mean, batch_var, count, momentum):
    return None


def schema_lists(bns: Sequence[BatchNorm]) -> tuple[list, list, list, list, list]:
    """The ``bn_weight, bn_bias, bn_mean, bn_var, bn_eps`` arguments of a fused op's schema."""
    return ([bn.weight for bn in bns], [bn.bias for bn in bns], [bn.running_mean for bn in bns],
            [bn.running_var for bn in bns], [float(bn.eps) for bn in bns])


def module_schema_lists(modules: Sequence[nn.Module]) -> tuple[list, list, list, list, list]:
    """:func:`schema_lists` of BatchNorm modules, read from their parameter and buffer dicts: the fused modules' eval
    path, where a :class:`BatchNorm` per module would cost more than a small kernel."""
    weights, biases, means, variances, eps = [], [], [], [], []
    for module in modules:  # one loop: five comprehensions (a function call each in Python 3.11) cost more
        parameters, buffers = module._parameters, module._buffers
        weights.append(parameters["weight"])
        biases.append(parameters["bias"])
        means.append(buffers["running_mean"])
        variances.append(buffers["running_var"])
        eps.append(float(module.eps))
    return weights, biases, means, variances, eps


def update_running_stats(bns: Sequence[BatchNorm], stats_mean: Tensor, stats_var: Tensor,
                         counts: Sequence[int]) -> None:
    """Apply each BatchNorm's running update from the packed statistics a fused op returned.

    stats_mean, stats_var: [sum of the BatchNorms' channels], in the order of ``bns``; counts: values per channel.
    """
    sizes = [bn.running_mean.shape[0] for bn in bns]
    buffers = [t for bn in bns for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    means, variances = stats_mean.detach().split(sizes), stats_var.detach().split(sizes)
    momenta = {bn.momentum for bn in bns}
    direct = unobserved(buffers + [stats_mean])
    if direct and len(momenta) == 1 and None not in momenta:
        # Nothing observes the update and the BatchNorms share one momentum: all of them in a few foreach calls
        # (one call per tensor per BatchNorm costs more than a small kernel).
        _update_stats_together(bns, means, variances, counts, momenta.pop())
        return
    update = _update_stats if direct else batch_norm_update_stats
    for bn, mean, var, count in zip(bns, means, variances, counts):
        update(bn.running_mean, bn.running_var, bn.num_batches_tracked, mean, var, count, bn.momentum)


def _update_stats_together(bns: Sequence[BatchNorm], means: Sequence[Tensor], variances: Sequence[Tensor],
                           counts: Sequence[int], momentum: float) -> None:
    """:func:`_update_stats` of every BatchNorm of ``bns`` (one momentum) with foreach ops."""
    torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    kept = [i for i, count in enumerate(counts) if count > 0]  # an empty batch only counts
    if not kept:
        return
    running_means = [bns[i].running_mean for i in kept]
    running_vars = [bns[i].running_var for i in kept]
    unbiased = torch._foreach_mul([variances[i] for i in kept], [counts[i] / (counts[i] - 1) for i in kept])
    # Each buffer written once, from a new value: threads training one model at once leave one call's update per
    # buffer, as nn.BatchNorm2d does, never a mixture.
    for running, batch in ((running_means, [means[i] for i in kept]), (running_vars, unbiased)):
        updated = torch._foreach_mul(running, 1 - momentum)
        torch._foreach_add_(updated, batch, alpha=momentum)
        torch._foreach_copy_(running, updated)
