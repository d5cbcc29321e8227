"""Distributed training: converted models under DistributedDataParallel, with BatchNorm2d and with SyncBatchNorm.

Two processes on 127.0.0.1 with the gloo backend (CPU), started by ``torch.multiprocessing.spawn``; every assertion
runs inside the processes, and a failure in either fails the test. Collectives time out after a minute, and spawn
joins (or terminates) both processes before the test returns.

* BatchNorm2d: the fused DDP model's outputs, input and parameter gradients and running statistics equal those of
  the eager model under the same DDP set-up.
* SyncBatchNorm (``nn.SyncBatchNorm.convert_sync_batchnorm``, before or after ``convert``). On CPU,
  ``nn.SyncBatchNorm`` refuses CPU tensors and DDP refuses SyncBatchNorm layers, so the processes average their
  gradients as DDP does (all-reduce, divide by the world size), and the reference is what SyncBatchNorm computes,
  written as one process: the eager model on the concatenated batch of both processes (statistics over all of it)
  whose loss is the sum of the processes' losses. The processes have different batch sizes (in one scenario one
  process has none). Every training forward of the fused modules must run a fused op with the process group (the
  backends' implementations are wrapped to record it); ``ops.dfc_attention`` is checked on its own too, with its
  running statistics. On a GPU (both processes on the one device, gloo), the fused model under DDP is compared with
  the eager ``nn.SyncBatchNorm`` model under DDP.
"""

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ghostfused

from ecosystem_helpers import OUT_CHANNELS, cuda_backends, requires_cuda, two_ghost_modules
from helpers import assert_close, cpu_backends, free_port, randomize_batch_norms

WORLD_SIZE = 2
DTYPE = torch.float64
BATCH_SIZES = (3, 2)  # per process: the statistics must weigh each process by its batch
EMPTY_PROCESS = (4, 0)  # the second process has no samples but takes part in every reduction
STEPS = 2



def _run(rank: int, world_size: int, port: int, scenario: str, device: str, backend: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        SCENARIOS[scenario](rank, torch.device(device), backend)
    finally:
        dist.destroy_process_group()


def _spawn(scenario: str, device: str = "cpu", backend: str = "auto"):
    mp.spawn(_run, args=(WORLD_SIZE, free_port(), scenario, device, backend), nprocs=WORLD_SIZE, join=True)


def _batches(step: int, device: torch.device, batch_sizes=BATCH_SIZES):
    """The inputs and output gradients of every process at ``step`` (the same on every process)."""
    generator = torch.Generator().manual_seed(100 + step)
    xs = [torch.randn(n, 5, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in batch_sizes]
    grads = [torch.randn(n, OUT_CHANNELS, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in batch_sizes]
    return xs, grads


def _step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), x.grad


def _assert_state(expected: nn.Module, actual: nn.Module, what: str, grad_scale: float = 1.0):
    """Parameter gradients (``expected``'s times ``grad_scale``) and buffers of the two models agree."""
    expected_params = dict(expected.named_parameters())
    for name, param in actual.named_parameters():
        assert_close(param.grad, expected_params[name].grad * grad_scale, DTYPE, f"{what}: grad {name}")
    expected_buffers = dict(expected.named_buffers())
    for name, buf in actual.named_buffers():
        assert_close(buf.to(DTYPE), expected_buffers[name].to(DTYPE), DTYPE, f"{what}: buffer {name}")


def _ddp(model: nn.Module, device: torch.device) -> DDP:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _ddp_batch_norm(rank: int, device: torch.device, backend: str, sync: bool = False):
    """Eager and fused models under DDP (with SyncBatchNorm when ``sync``): the same results."""
    torch.manual_seed(0)  # the same model on every process
    model = two_ghost_modules(dtype=DTYPE).to(device).train()
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    if sync:
        model, fused = nn.SyncBatchNorm.convert_sync_batchnorm(model), nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    eager_ddp, fused_ddp = _ddp(model, device), _ddp(fused, device)
    for step in range(STEPS):
        xs, grads = _batches(step, device)
        expected, expected_dx = _step(eager_ddp, xs[rank], grads[rank])
        actual, actual_dx = _step(fused_ddp, xs[rank], grads[rank])
        assert_close(actual, expected, DTYPE, f"rank {rank} step {step}: output")
        assert_close(actual_dx, expected_dx, DTYPE, f"rank {rank} step {step}: input gradient")
    _assert_state(model, fused, f"rank {rank}")


def _average_gradients(model: nn.Module):
    """What DDP does to the gradients: the mean over the processes."""
    for param in model.parameters():
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()


class _FusedCalls:
    """Records the ``sync_group`` argument of every fused-op forward (the backends' implementations are wrapped)."""

    def __init__(self):
        self.groups = []
        implementation = ghostfused.backends.implementation

        def recording(name, op):
            inner = implementation(name, op)

            def forward(*args):
                self.groups.append(args[-1])
                return inner.forward(*args)

            return inner._replace(forward=forward)

        ghostfused.backends.implementation = recording

    def take(self) -> list:
        groups, self.groups = self.groups, []
        return groups


def _sync_batch_norm(rank: int, device: torch.device, backend: str, batch_sizes=BATCH_SIZES):
    torch.manual_seed(0)
    model = two_ghost_modules(dtype=DTYPE).to(device).train()
    variants = {
        "convert, then convert_sync_batchnorm":
            nn.SyncBatchNorm.convert_sync_batchnorm(ghostfused.convert(copy.deepcopy(model), backend=backend)),
        "convert_sync_batchnorm, then convert":
            ghostfused.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)), backend=backend),
    }
    calls = _FusedCalls()
    group = dist.group.WORLD.group_name
    for name, fused in variants.items():
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in fused.modules()) == 7, name
        assert sum(isinstance(m, ghostfused.nn.GhostModuleV2) for m in fused.modules()) == 2, name
        reference = copy.deepcopy(model)
        for step in range(STEPS):
            xs, grads = _batches(step, device, batch_sizes)
            x = torch.cat(xs).requires_grad_()
            expected = reference(x)
            expected.backward(torch.cat(grads))  # the sum of every process's loss
            begin = sum(batch_sizes[:rank])
            shard = slice(begin, begin + batch_sizes[rank])
            actual, actual_dx = _step(fused, xs[rank], grads[rank])
            what = f"{name}, rank {rank}, step {step}"
            assert_close(actual, expected.detach()[shard], DTYPE, f"{what}: output")
            assert_close(actual_dx, x.grad[shard], DTYPE, f"{what}: input gradient")
        _average_gradients(fused)
        _assert_state(reference, fused, f"{name}, rank {rank}", grad_scale=1 / WORLD_SIZE)
        # Both Ghost modules ran fused ops that synchronised, every step.
        assert calls.take() == [group] * 2 * STEPS, f"{name}: fused calls"
        # In eval mode SyncBatchNorm uses its running statistics, local as BatchNorm2d: fused ops, no group.
        fused.eval()
        reference.eval()
        with torch.no_grad():
            x = _batches(STEPS, device, batch_sizes)[0][rank]
            assert_close(fused(x), reference(x), DTYPE, f"{name}, rank {rank}: eval output")
        assert calls.take() == [None] * 2, f"{name}: eval calls"


def _sync_dfc_attention(rank: int, device: torch.device, backend: str, batch_sizes=BATCH_SIZES):
    """``ops.dfc_attention`` with three synchronising SyncBatchNorms: the eager function on the global batch."""
    torch.manual_seed(0)
    module = randomize_batch_norms(ghostfused.reference.GhostModuleV2(5, 4, mode="attn")).to(DTYPE).to(device).train()
    conv, conv_bn, horizontal, horizontal_bn, vertical, vertical_bn = module.short_conv
    reference_bns = copy.deepcopy([conv_bn, horizontal_bn, vertical_bn])
    sync_bns = [nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn)) for bn in reference_bns]
    weights = [conv.weight, horizontal.weight, vertical.weight]
    generator = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, 5, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in batch_sizes]
    features = [torch.randn(n, 4, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in batch_sizes]
    grads = [torch.randn(n, 4, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in batch_sizes]

    def run(x, feature, grad, bns):
        x, feature = x.clone().requires_grad_(), feature.clone().requires_grad_()
        out = ghostfused.ops.dfc_attention(x, feature, weights[0], bns[0], weights[1], bns[1], weights[2], bns[2],
                                           training=True, backend=backend)
        out.backward(grad)
        return out.detach(), x.grad, feature.grad

    expected = run(torch.cat(xs), torch.cat(features), torch.cat(grads), reference_bns)
    actual = run(xs[rank], features[rank], grads[rank], sync_bns)
    begin = sum(batch_sizes[:rank])
    shard = slice(begin, begin + batch_sizes[rank])
    for name, a, e in zip(("output", "x gradient", "features gradient"), actual, expected):
        assert_close(a, e[shard], DTYPE, f"rank {rank}: dfc_attention {name}")
    for sync_bn, bn in zip(sync_bns, reference_bns):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(sync_bn, name).to(DTYPE), getattr(bn, name).to(DTYPE), DTYPE, f"rank {rank}: {name}")
    # Only one BatchNorm synchronising: the op refuses to mix the local batch with the group's.
    with pytest.raises(ValueError, match="different process group"):
        ghostfused.ops.dfc_attention(xs[rank], features[rank], weights[0], sync_bns[0], weights[1], reference_bns[1],
                                     weights[2], reference_bns[2], training=True, backend=backend)


def _sync_depthwise_bn(rank: int, device: torch.device, backend: str, batch_sizes=BATCH_SIZES):
    """``ops.depthwise_bn`` (stride 2) with a synchronising SyncBatchNorm, NCHW (the cpu kernel's SyncGroup path):
    the eager layers on the global batch; an empty process takes part too."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, 2, 1, groups=4, bias=False).to(DTYPE).to(device)
    bn = randomize_batch_norms(nn.Sequential(nn.BatchNorm2d(4)))[0].to(DTYPE).to(device)
    sync_bn = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(bn))
    generator = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, 4, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in batch_sizes]
    grads = [torch.randn(n, 4, 4, 3, dtype=DTYPE, generator=generator).to(device) for n in batch_sizes]
    x = torch.cat(xs).requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()
    expected = bn(F.conv2d(x, weight, stride=2, padding=1, groups=4))
    expected.backward(torch.cat(grads))
    x_local = xs[rank].clone().requires_grad_()
    weight_local = conv.weight.detach().clone().requires_grad_()
    actual = ghostfused.ops.depthwise_bn(x_local, weight_local, sync_bn, 2, training=True, backend=backend)
    actual.backward(grads[rank])
    begin = sum(batch_sizes[:rank])
    shard = slice(begin, begin + batch_sizes[rank])
    assert_close(actual.detach(), expected.detach()[shard], DTYPE, f"rank {rank}: depthwise_bn output")
    assert_close(x_local.grad, x.grad[shard], DTYPE, f"rank {rank}: depthwise_bn x gradient")
    for param in (weight_local, sync_bn.weight, sync_bn.bias):  # local gradients sum to the global batch's
        dist.all_reduce(param.grad)
    assert_close(weight_local.grad, weight.grad, DTYPE, f"rank {rank}: depthwise_bn weight gradient")
    assert_close(sync_bn.weight.grad, bn.weight.grad, DTYPE, f"rank {rank}: BatchNorm weight gradient")
    assert_close(sync_bn.bias.grad, bn.bias.grad, DTYPE, f"rank {rank}: BatchNorm bias gradient")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(sync_bn, name).to(DTYPE), getattr(bn, name).to(DTYPE), DTYPE, f"rank {rank}: {name}")


SCENARIOS = {"ddp_batch_norm": _ddp_batch_norm, "sync_batch_norm": _sync_batch_norm,
             "sync_batch_norm_empty_process": lambda rank, device, backend: _sync_batch_norm(rank, device, backend,
                                                                                            EMPTY_PROCESS),
             "sync_dfc_attention": _sync_dfc_attention, "sync_depthwise_bn": _sync_depthwise_bn,
             "sync_depthwise_bn_empty_process": lambda rank, device, backend: _sync_depthwise_bn(rank, device, backend,
                                                                                                EMPTY_PROCESS),
             "ddp_sync_batch_norm": lambda rank, device, backend: _ddp_batch_norm(rank, device, backend, sync=True)}


@pytest.mark.parametrize("backend", cpu_backends())
def test_ddp_with_batch_norm_matches_eager_ddp(backend):
    _spawn("ddp_batch_norm", backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("scenario", ["sync_batch_norm", "sync_batch_norm_empty_process", "sync_dfc_attention",
                                      "sync_depthwise_bn", "sync_depthwise_bn_empty_process"])
def test_sync_batch_norm_matches_the_global_batch(scenario, backend):
    _spawn(scenario, backend=backend)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("scenario", ["ddp_batch_norm", "ddp_sync_batch_norm", "sync_batch_norm",
                                      "sync_batch_norm_empty_process", "sync_dfc_attention"])
def test_distributed_on_gpu(scenario, backend):
    """Both processes on the one GPU (gloo): DDP with BatchNorm2d and with nn.SyncBatchNorm's own CUDA path as the
    eager reference, and the global-batch checks."""
    _spawn(scenario, device="cuda:0", backend=backend)
