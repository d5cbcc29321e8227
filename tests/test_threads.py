"""Threads: two Python threads using one fused CPU model at the same time.

* Eval mode: both threads get the right output and input gradient on every call (nothing in a forward or backward
  is shared between calls but the parameters and buffers, which eval mode only reads).
* Train mode: each call's output is right (training normalises with the call's own batch statistics). The running
  statistics and ``num_batches_tracked`` are shared state that every training call updates in place without a lock,
  exactly as ``nn.BatchNorm2d`` does: concurrent calls apply their updates in either order, or one update overwrites
  the other. The test checks that every element of the running statistics ends as one of those outcomes, for the
  fused model and for eager PyTorch alike, and that nothing else (NaN, a torn mixture) comes out. Train
  concurrently only if losing an update of the running statistics is acceptable, as with eager PyTorch.

An interpreted backend (Triton without a GPU) is left out: the interpreter patches ``triton.language`` globally while
a kernel runs, which is a property of the interpreter, not of the kernels a GPU runs.
"""

import copy
import itertools
import threading

import pytest
import torch
import torch.nn as nn

from helpers import assert_close, fused_copy, randomize_batch_norms
from ghostfused import reference
from reliability_helpers import native_cpu_backends

ITERATIONS = 10
DTYPE = torch.float64


def _model() -> nn.Sequential:
    """An 'attn' Ghost module, a ReLU and an 'original' one (ghost1 and ghost2 of a bottleneck)."""
    model = nn.Sequential(reference.GhostModuleV2(5, 7, mode="attn"), nn.ReLU(),
                          reference.GhostModuleV2(7, 6, mode="original", relu=False))
    return randomize_batch_norms(model).to(DTYPE)


def _run_concurrently(work, count: int = 2) -> None:
    """Run ``work(i)`` in ``count`` threads started together; re-raise the first exception any of them raised."""
    barrier = threading.Barrier(count)
    errors = []

    def target(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("backend", native_cpu_backends())
def test_eval_forward_and_backward_in_two_threads(backend):
    eager = _model().eval()
    fused = fused_copy(eager, backend)
    inputs = [torch.randn(2, 5, 17, 13, dtype=DTYPE), torch.randn(3, 5, 11, 16, dtype=DTYPE)]
    grads = [torch.randn(2, 6, 17, 13, dtype=DTYPE), torch.randn(3, 6, 11, 16, dtype=DTYPE)]
    expected = []
    for x, g in zip(inputs, grads):
        x = x.clone().requires_grad_()
        out = eager(x)
        expected.append((out.detach(), torch.autograd.grad(out, x, g)[0]))
    results = [[], []]

    def work(i):
        for _ in range(ITERATIONS):
            x = inputs[i].clone().requires_grad_()
            out = fused(x)
            results[i].append((out.detach(), torch.autograd.grad(out, x, grads[i])[0]))

    _run_concurrently(work)
    for i in range(2):
        assert len(results[i]) == ITERATIONS
        for out, dx in results[i]:
            assert_close(out, expected[i][0], DTYPE, f"thread {i} output")
            assert_close(dx, expected[i][1], DTYPE, f"thread {i} input gradient")
    for name, buf in fused.named_buffers():  # eval mode never writes the buffers
        assert torch.equal(buf, dict(eager.named_buffers())[name]), name


def _serial_outcomes(model: nn.Module, inputs) -> list[dict]:
    """The buffers after each serial order of the training calls on ``inputs``, and after each call alone."""
    outcomes = []
    for order in [*itertools.permutations(range(len(inputs))), *[(i,) for i in range(len(inputs))]]:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for i in order:
                m(inputs[i])
        outcomes.append(dict(m.named_buffers()))
    return outcomes


def _assert_one_of(model: nn.Module, outcomes: list[dict], what: str) -> None:
    for name, buf in model.named_buffers():
        candidates = torch.stack([o[name].to(buf.dtype) for o in outcomes])
        if buf.is_floating_point():
            matches = torch.isclose(buf[None], candidates, rtol=1e-9, atol=1e-12).any(0)
        else:
            matches = (buf[None] == candidates).any(0)
        assert matches.all(), f"{what}: {name} = {buf} is no serial outcome of the updates {candidates}"


@pytest.mark.parametrize("backend", [None, *native_cpu_backends()], ids=lambda b: b or "eager-pytorch")
def test_train_forward_in_two_threads(backend):
    eager = _model().train()
    inputs = [torch.randn(2, 5, 9, 8, dtype=DTYPE), torch.randn(3, 5, 9, 8, dtype=DTYPE)]
    with torch.no_grad():
        expected = [copy.deepcopy(eager)(x) for x in inputs]
    outcomes = _serial_outcomes(eager, inputs)
    for trial in range(5):
        model = copy.deepcopy(eager) if backend is None else fused_copy(eager, backend)
        outputs = [None, None]

        def work(i):
            with torch.no_grad():
                outputs[i] = model(inputs[i])

        _run_concurrently(work)
        for i in range(2):
            assert_close(outputs[i], expected[i], DTYPE, f"trial {trial}, thread {i} output")
        _assert_one_of(model, outcomes, f"trial {trial}")
