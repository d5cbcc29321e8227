"""Sums over a ``torch.distributed`` process group: the statistics of BatchNorms that synchronise.

An ``nn.SyncBatchNorm`` in training over several processes normalises with the mean and variance of the batch of
every process, and its input gradient takes the per-channel gradient sums over every process. The fused ops take
the group by name (``ProcessGroup.group_name``, the op argument ``sync_group``) and reduce each BatchNorm where it
completes its statistics: the C++ kernels in ``csrc/glue.cpp`` (``SyncGroup``), the Python backends (``eager``,
``triton``) with the functions here, the same arithmetic:

* moments: the group's count and mean from one all-reduce of ``count * mean`` and ``count``, then the biased
  variance from a second all-reduce of ``count * (var + (mean - group_mean)^2)`` (squared deviations about the
  group's mean: no cancellation);
* gradient sums: one all-reduce of ``(sum dy, sum dy * (x - mean))`` and the count; the BatchNorm's weight and
  bias gradients keep this process's sums, as ``nn.SyncBatchNorm``'s.

All reductions are float64 sums by PyTorch's functional collectives (gloo on CPU, nccl on GPUs). Every process of
the group must make the same calls in the same order, so the backends reduce every BatchNorm at the same point of the
same code whatever their local batch (N = 0 included).
"""

import torch
from torch import Tensor


def _all_reduce(t: Tensor, group: str) -> Tensor:
    reduced = torch.ops._c10d_functional.all_reduce(t.contiguous(), "sum", group)
    return torch.ops._c10d_functional.wait_tensor(reduced)


class _AllReduceSum(torch.autograd.Function):
    """The sum over the processes of a group; its backward sums the gradients the same way (each process's input
    feeds every process's result)."""

    @staticmethod
    def forward(t: Tensor, group: str) -> Tensor:
        return _all_reduce(t, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


def all_reduce_sum(t: Tensor, group: str) -> Tensor:
    """The sum of ``t`` over the processes of the group named ``group``; differentiable (also under ``torch.func``)."""
    return _AllReduceSum.apply(t, group)


def group_moments(mean: Tensor, var: Tensor, count: int, group: str) -> tuple[Tensor, Tensor]:
    """The group's per-channel mean and biased variance from this process's ``mean``, ``var`` [C] over ``count``
    values per channel, in float64. Differentiable. An empty group batch has mean 0, var 1."""
    mean, var = mean.to(torch.float64), var.to(torch.float64)
    sums = all_reduce_sum(torch.cat([mean * count, mean.new_full((1,), count)]), group)
    total = int(sums[-1].item())
    if total == 0:
        return torch.zeros_like(mean), torch.ones_like(var)
    group_mean = sums[:-1] / total
    m2 = all_reduce_sum((var + (mean - group_mean).square()) * count, group)
    return group_mean, m2 / total


def group_grad_sums(sums: Tensor, count: int, group: str) -> tuple[Tensor, int]:
    """The group's gradient sums from this process's ``sums`` (float64, any shape) over ``count`` values per
    channel, and the group's count."""
    total = _all_reduce(torch.cat([sums.reshape(-1).to(torch.float64), sums.new_full((1,), count,
                                                                                      dtype=torch.float64)]), group)
    return total[:-1].view(sums.shape), int(total[-1].item())


def group_counts(counts: list[int], group: str, device: torch.device) -> list[int]:
    """Each of ``counts`` (values per channel of a BatchNorm on this process) summed over the group; ``device``:
    where the group's collectives run (x's device)."""
    local = torch.tensor(counts, dtype=torch.float64, device=device)
    return [int(c) for c in _all_reduce(local, group).tolist()]
