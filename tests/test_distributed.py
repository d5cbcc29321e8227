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
  whose loss is the sum of the processes' losses. The processes have different batch sizes. On a GPU (both
  processes on the one device, gloo), the fused model under DDP is compared with the eager ``nn.SyncBatchNorm``
  model under DDP.
"""

import copy
import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ghostfused

from ecosystem_helpers import OUT_CHANNELS, cuda_backends, requires_cuda, two_ghost_modules
from helpers import assert_close, cpu_backends

WORLD_SIZE = 2
DTYPE = torch.float64
BATCH_SIZES = (3, 2)  # per process: the statistics must weigh each process by its batch
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world_size: int, port: int, scenario: str, device: str, backend: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        SCENARIOS[scenario](rank, torch.device(device), backend)
    finally:
        dist.destroy_process_group()


def _spawn(scenario: str, device: str = "cpu", backend: str = "auto"):
    mp.spawn(_run, args=(WORLD_SIZE, _free_port(), scenario, device, backend), nprocs=WORLD_SIZE, join=True)


def _batches(step: int, device: torch.device):
    """The inputs and output gradients of every process at ``step`` (the same on every process)."""
    generator = torch.Generator().manual_seed(100 + step)
    xs = [torch.randn(n, 5, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in BATCH_SIZES]
    grads = [torch.randn(n, OUT_CHANNELS, 7, 6, dtype=DTYPE, generator=generator).to(device) for n in BATCH_SIZES]
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


class _SynchronisedCalls:
    """Counts the Ghost-module forwards that take the synchronised (unfused) path."""

    def __init__(self):
        self.count = 0
        forward = ghostfused.nn.GhostModuleV2._forward_synchronised

        def counting(module, x):
            self.count += 1
            return forward(module, x)

        ghostfused.nn.GhostModuleV2._forward_synchronised = counting


def _sync_batch_norm(rank: int, device: torch.device, backend: str):
    torch.manual_seed(0)
    model = two_ghost_modules(dtype=DTYPE).to(device).train()
    variants = {
        "convert, then convert_sync_batchnorm":
            nn.SyncBatchNorm.convert_sync_batchnorm(ghostfused.convert(copy.deepcopy(model), backend=backend)),
        "convert_sync_batchnorm, then convert":
            ghostfused.convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)), backend=backend),
    }
    calls = _SynchronisedCalls()
    for name, fused in variants.items():
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in fused.modules()) == 7, name
        assert sum(isinstance(m, ghostfused.nn.GhostModuleV2) for m in fused.modules()) == 2, name
        reference = copy.deepcopy(model)
        for step in range(STEPS):
            xs, grads = _batches(step, device)
            x = torch.cat(xs).requires_grad_()
            expected = reference(x)
            expected.backward(torch.cat(grads))  # the sum of every process's loss
            begin = sum(BATCH_SIZES[:rank])
            shard = slice(begin, begin + BATCH_SIZES[rank])
            actual, actual_dx = _step(fused, xs[rank], grads[rank])
            what = f"{name}, rank {rank}, step {step}"
            assert_close(actual, expected.detach()[shard], DTYPE, f"{what}: output")
            assert_close(actual_dx, x.grad[shard], DTYPE, f"{what}: input gradient")
        _average_gradients(fused)
        _assert_state(reference, fused, f"{name}, rank {rank}", grad_scale=1 / WORLD_SIZE)
        # In eval mode SyncBatchNorm uses its running statistics, local as BatchNorm2d: the fused ops run.
        trained = calls.count
        assert trained == 2 * STEPS, f"{name}: {trained} synchronised forwards"
        fused.eval()
        reference.eval()
        with torch.no_grad():
            x = _batches(STEPS, device)[0][rank]
            assert_close(fused(x), reference(x), DTYPE, f"{name}, rank {rank}: eval output")
        assert calls.count == trained, f"{name}: eval took the synchronised path"
        calls.count = 0


SCENARIOS = {"ddp_batch_norm": _ddp_batch_norm, "sync_batch_norm": _sync_batch_norm,
             "ddp_sync_batch_norm": lambda rank, device, backend: _ddp_batch_norm(rank, device, backend, sync=True)}


@pytest.mark.parametrize("backend", cpu_backends())
def test_ddp_with_batch_norm_matches_eager_ddp(backend):
    _spawn("ddp_batch_norm", backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_sync_batch_norm_matches_the_global_batch(backend):
    _spawn("sync_batch_norm", backend=backend)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("scenario", ["ddp_batch_norm", "ddp_sync_batch_norm", "sync_batch_norm"])
def test_distributed_on_gpu(scenario, backend):
    """Both processes on the one GPU (gloo): DDP with BatchNorm2d and with nn.SyncBatchNorm's own CUDA path as the
    eager reference, and the global-batch check."""
    _spawn(scenario, device="cuda:0", backend=backend)
