"""Mixed precision: under torch.autocast the fused modules return what the eager modules return.

Eager autocast runs the convolutions in the autocast dtype and BatchNorm in its input's dtype with float32
parameters and statistics. The fused modules must give the same output dtype, values within the tolerance of that
dtype, float32 gradients for the float32 weights and float32 running statistics, eager and under torch.compile.
On CPU: bfloat16 (the eager backend computes in bfloat16 here); on a GPU: bfloat16 and float16.
"""

import copy

import pytest
import torch

import ghostfused
from ghostfused.models import ghostnetv2

from ecosystem_helpers import OUT_CHANNELS, cuda_backends, requires_cuda, two_ghost_modules
from helpers import assert_close, randomize_batch_norms


def _step(model, x, grad, device_type, dtype):
    """Forward under autocast, backward outside it (as training loops do); returns (output, input gradient)."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast(device_type, dtype=dtype):
        out = model(x)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad


def _assert_matches_eager(model, fused, device_type, dtype, steps=2, scale=1.0, run=None):
    """Two autocast steps of the eager two_ghost_modules and of ``run`` (default: the fused copy itself, else its
    compiled form); outputs and gradients in the eager dtypes and values, then the fused copy's parameter gradients
    and buffers."""
    run = run or fused
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(3, 5, 9, 6, device=device)
        grad = torch.randn(3, OUT_CHANNELS, 9, 6, device=device)
        expected, expected_dx = _step(model, x, grad, device_type, dtype)
        actual, actual_dx = _step(run, x, grad, device_type, dtype)
        assert actual.dtype == expected.dtype == dtype
        assert actual_dx.dtype == torch.float32
        assert_close(actual.float(), expected.float(), dtype, "output", scale)
        # The input gradient sums products of low-precision terms too (eager's rounding depends on the CPU: without
        # AVX-512 BF16, oneDNN rounds differently): compare relative to its size, as the weight gradients below.
        assert_close(actual_dx, expected_dx, dtype, "input gradient", scale * max(1.0, expected_dx.abs().max().item()))
    ref_params = dict(model.named_parameters())
    for name, param in fused.named_parameters():
        assert param.dtype == param.grad.dtype == torch.float32, name
        # Weight gradients sum over the batch in the low precision: compare relative to their size.
        expected = ref_params[name].grad
        assert_close(param.grad, expected, dtype, f"grad {name}", scale * max(1.0, expected.abs().max().item()))
    ref_buffers = dict(model.named_buffers())
    for name, buf in fused.named_buffers():
        assert buf.dtype == ref_buffers[name].dtype, name
        if buf.is_floating_point():
            assert_close(buf, ref_buffers[name], dtype, f"buffer {name}", scale)
        else:
            assert torch.equal(buf, ref_buffers[name]), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bf16_autocast_on_cpu_matches_eager(training):
    model = two_ghost_modules().train(training)
    fused = ghostfused.convert(copy.deepcopy(model))
    _assert_matches_eager(model, fused, "cpu", torch.bfloat16)


def test_bf16_autocast_under_compile_matches_eager():
    model = two_ghost_modules().train()
    fused = ghostfused.convert(copy.deepcopy(model))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    _assert_matches_eager(model, fused, "cpu", torch.bfloat16, run=compiled)


def test_bf16_autocast_whole_model_on_cpu():
    model = randomize_batch_norms(ghostnetv2(0.5, num_classes=10, backend=None)).eval()
    fused = ghostfused.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(x), fused(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0.1, atol=0.1)


def test_float64_is_left_alone_under_autocast():
    """Autocast does not cast float64 tensors; neither do the fused modules."""
    model = two_ghost_modules(dtype=torch.float64).eval()
    fused = ghostfused.convert(copy.deepcopy(model))
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(x), fused(x)
    assert actual.dtype == expected.dtype == torch.float64
    assert_close(actual, expected, torch.float64, "output")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autocast_on_gpu_matches_eager(backend, dtype, training):
    model = two_ghost_modules().cuda().train(training)
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    _assert_matches_eager(model, fused, "cuda", dtype)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_bf16_autocast_under_inductor_on_gpu(backend):
    model = two_ghost_modules().cuda().train()
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    _assert_matches_eager(model, fused, "cuda", torch.bfloat16, run=torch.compile(fused, fullgraph=True))
