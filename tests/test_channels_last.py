"""channels_last: models in torch.channels_last run through the fused ops without layout copies around the kernels
and return channels_last outputs wherever the eager model does, with the eager values."""

import copy

import pytest
import torch
import torch.nn as nn

import ghostfused
from ghostfused import backends
from ghostfused.convert import is_ghost_module
from ghostfused.models import ghostnetv2

from ecosystem_helpers import OUT_CHANNELS, cuda_backends, fused_modules, requires_cuda, two_ghost_modules
from helpers import (TOLERANCES, assert_close, assert_modules_match, cpu_backends, full_size_copies, op_arguments,
                     randomize_batch_norms, run_step)

CHANNELS_LAST = torch.channels_last


def _is_channels_last_strided(t: torch.Tensor) -> bool:
    """Channels innermost (dense or a channel slice of a dense channels_last tensor)."""
    return t.shape[1] > 1 and t.stride(1) == 1


class _KernelCalls:
    """Records the tensors the backend's forward and backward receive and return (patched into
    ``backends.implementation``, which the custom ops call)."""

    def __init__(self, monkeypatch):
        self.forward, self.backward = [], []
        implementation = backends.implementation

        def recording(name, op):
            inner = implementation(name, op)

            def forward(*args):
                result = inner.forward(*args)
                self.forward.append((args[0], result[0]))
                return result

            def backward(grad_out, saved, *args):
                self.backward.append(grad_out)
                return inner.backward(grad_out, saved, *args)

            return backends.Implementation(forward, backward)

        monkeypatch.setattr(backends, "implementation", recording)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["original", "attn"])
@pytest.mark.parametrize("oup", [5, 6])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_layout_copy_between_module_and_kernel(monkeypatch, backend, mode, oup, training):
    """The kernel receives the module's channels_last input itself, the module returns the kernel's output itself,
    and the backward hands the kernel the channels_last gradient without a copy."""
    model = randomize_batch_norms(ghostfused.reference.GhostModuleV2(5, oup, mode=mode)).train(training)
    fused = ghostfused.convert(copy.deepcopy(model).to(memory_format=CHANNELS_LAST), backend=backend)
    calls = _KernelCalls(monkeypatch)
    x = torch.randn(2, 5, 7, 6).to(memory_format=CHANNELS_LAST).requires_grad_()
    out = fused(x)
    (kernel_x, kernel_out), = calls.forward
    assert kernel_x.data_ptr() == x.data_ptr() and kernel_x.stride() == x.stride(), "x was copied"
    # A kernel's fresh output comes back as it is; only a view of a backend's intermediate (the eager reference's
    # channel slice) is copied, so that the result may be updated in place.
    if kernel_out._base is None:
        assert out.data_ptr() == kernel_out.data_ptr() and out.stride() == kernel_out.stride(), "output was copied"
    assert out.is_contiguous(memory_format=CHANNELS_LAST)
    grad = torch.randn(2, oup, 7, 6).to(memory_format=CHANNELS_LAST)
    out.backward(grad)
    kernel_grad, = calls.backward
    assert kernel_grad.data_ptr() == grad.data_ptr() and kernel_grad.stride() == grad.stride(), "grad was copied"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_ghost_modules_match_eager(backend, training):
    model = two_ghost_modules(dtype=torch.float64).to(memory_format=CHANNELS_LAST).train(training)
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    for _ in range(2):
        x = torch.randn(3, 5, 9, 6, dtype=torch.float64).to(memory_format=CHANNELS_LAST)
        grad = torch.randn(3, OUT_CHANNELS, 9, 6, dtype=torch.float64).to(memory_format=CHANNELS_LAST)
        expected, expected_dx = run_step(model, x, grad)
        actual, actual_dx = run_step(fused, x, grad)
        assert _is_channels_last_strided(expected)
        assert actual.is_contiguous(memory_format=CHANNELS_LAST)
        assert_close(actual, expected, torch.float64, "output")
        assert_close(actual_dx, expected_dx, torch.float64, "input gradient")
    assert_modules_match(model, fused, torch.float64)


def _ghost_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of every Ghost module of ``model`` (in call order) for input ``x``."""
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
             for m in model.modules() if is_ghost_module(m)]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _assert_whole_model_layouts_match(model, fused, x, tolerance=TOLERANCES[torch.float32][0]):
    """Every Ghost module's output of ``fused`` against ``model``'s for input x, in layout and value. The default
    tolerance is one op's in float32: the rounding differences of eager's convolutions and the kernels' GEMMs compound
    through the 32 modules (1.5e-4 at the 31st module on an AVX-512 machine, in one value of 3840)."""
    expected, actual = _ghost_outputs(model, x), _ghost_outputs(fused, x)
    assert len(expected) == len(actual) == 32
    for i, (e, a) in enumerate(zip(expected, actual)):
        if _is_channels_last_strided(e):
            assert a.is_contiguous(memory_format=CHANNELS_LAST), f"Ghost module {i}: not channels_last"
        torch.testing.assert_close(a, e, rtol=tolerance, atol=tolerance, msg=lambda m: f"Ghost module {i}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_whole_model(training):
    model = randomize_batch_norms(ghostnetv2(0.5, num_classes=10, backend=None, dropout=0.0))
    model = model.to(memory_format=CHANNELS_LAST).train(training)
    fused = ghostfused.convert(copy.deepcopy(model))
    assert len(fused_modules(fused)) == 32
    x = torch.randn(2, 3, 64, 48).to(memory_format=CHANNELS_LAST)
    _assert_whole_model_layouts_match(model, fused, x)
    assert_modules_match(model, fused, torch.float32)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_channels_last_whole_model_on_gpu(backend):
    model = randomize_batch_norms(ghostnetv2(1.0, num_classes=10, backend=None)).cuda().eval()
    model = model.to(memory_format=CHANNELS_LAST)
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    x = torch.randn(4, 3, 96, 80, device="cuda").to(memory_format=CHANNELS_LAST)
    with torch.no_grad():
        _assert_whole_model_layouts_match(model, fused, x, tolerance=1e-2)  # TF32 on either side


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif("cuda" not in cuda_backends(), reason="the extension is built without CUDA")
@pytest.mark.parametrize("op", ["ghost_concat", "dfc_attention", "ghost_attn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_kernels_make_no_layout_copy(op, training):
    """The cuda glue copies no full-resolution tensor of a channels_last call (tests/test_cuda_emulation.py checks the
    same glue on the CPU)."""
    args = op_arguments(op, 2, 5, 7, 9, 6, training, dtype=torch.float32, channels_last=True, device="cuda")
    raw = (getattr(torch.ops.ghostfused_C, f"{op}_{direction}") for direction in ("forward", "backward"))
    copies, results = full_size_copies(op, args, CHANNELS_LAST, *raw)
    assert copies == []
    assert all(t.is_contiguous(memory_format=CHANNELS_LAST) for t in results)
