"""Cross-process BatchNorm: what ``nn.SyncBatchNorm`` computes in training, for the Ghost modules that hold one.

A SyncBatchNorm in training over several processes normalises with the statistics of the batch of every process,
and its backward all-reduces the per-channel gradient sums those statistics need. The fused ops compute each
BatchNorm's statistics inside the op, between the stages of one pass, where no cross-process reduction can happen;
so a fused Ghost module whose BatchNorms synchronise runs the eager composition with :func:`sync_batch_norm`
instead (not fused). ``nn.SyncBatchNorm`` itself only accepts GPU tensors; this works on any device and any
``torch.distributed`` backend (gloo on CPU, nccl on GPU).

Forward: each process reduces its batch to per-channel (count, sum, sum of squares), taken from its batch mean and
biased variance, in float64; one all-reduce gives the global mean and variance. Backward: the all-reduce is
differentiable (its backward all-reduces the gradient of those sums), so every process receives the gradient of the
sum of all processes' losses with respect to its own input, as with ``nn.SyncBatchNorm``.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from ..reference import stats_dtype
from .batch_norm import batch_norm_update_stats


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of ``group``; the backward sums the gradients the same way."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def sync_batch_norm(x: Tensor, bn: torch.nn.SyncBatchNorm, group) -> Tensor:
    """``bn`` (an ``nn.SyncBatchNorm`` in training) applied to x with the statistics of the whole batch of ``group``.

    x: [N, C, H, W] on this process (N may differ between processes, even be 0). Normalises in float32 (float64
    for float64 x) and returns x's dtype, as BatchNorm does under autocast. Updates ``bn``'s running statistics
    with the global batch mean and unbiased variance, as ``nn.SyncBatchNorm`` does. Differentiable with respect
    to x, ``bn.weight`` and ``bn.bias``. Raises ValueError when the whole batch holds one value per channel.
    """
    acc = stats_dtype(x)
    count = x.numel() // x.shape[1]
    if count > 0:
        var, mean = torch.var_mean(x.to(acc), dim=(0, 2, 3), correction=0)
    else:  # this process has no samples: it adds nothing to the sums
        mean = var = x.new_zeros(x.shape[1], dtype=acc)
    local = torch.stack([torch.full_like(mean, count), mean * count, (var + mean * mean) * count])
    total = _AllReduceSum.apply(local.to(torch.float64), group)
    global_count = int(total[0, 0].item())
    if global_count <= 1:
        raise ValueError(f"expected more than 1 value per channel over all processes when training, got "
                         f"{global_count} (SyncBatchNorm of {x.shape[1]} channels)")
    global_mean = total[1] / global_count
    global_var = (total[2] / global_count - global_mean * global_mean).clamp_min(0)
    scale = bn.weight.to(acc) * torch.rsqrt(global_var.to(acc) + bn.eps)
    shift = bn.bias.to(acc) - global_mean.to(acc) * scale
    with torch.no_grad():
        batch_norm_update_stats(bn.running_mean, bn.running_var, bn.num_batches_tracked, global_mean.detach().to(acc),
                                global_var.detach().to(acc), global_count, bn.momentum)
    return (x.to(acc) * scale[:, None, None] + shift[:, None, None]).to(x.dtype)
