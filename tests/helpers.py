"""Shared test helpers: random Ghost modules, the fused copy of a module, and comparisons with the reference."""

import copy

import torch
import torch.nn as nn

import ghostfused
from ghostfused import backends, reference
from ghostfused.testing import randomize_batch_norms

TOLERANCES = {  # (rtol, atol) for comparing a backend with the eager reference
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors here (triton only under the interpreter)."""
    return [b for b in ghostfused.available_backends() if backends.supports_device(b, torch.device("cpu"))]


def ghost_module(inp: int, oup: int, mode: str = "attn", dtype=torch.float64, **kwargs) -> reference.GhostModuleV2:
    """A reference Ghost module with random weights and BatchNorm state."""
    return randomize_batch_norms(reference.GhostModuleV2(inp, oup, mode=mode, **kwargs)).to(dtype)


def fused_copy(module: nn.Module, backend: str) -> nn.Module:
    """A deep copy of ``module`` converted to ``backend`` (the original stays the reference)."""
    return ghostfused.convert(copy.deepcopy(module), backend=backend)


def assert_close(actual, expected, dtype, what: str = "", scale: float = 1.0):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_modules_match(reference_module: nn.Module, fused: nn.Module, dtype, what: str = ""):
    """Parameters' gradients and buffers (running statistics, counters) of the two modules agree."""
    ref_params = dict(reference_module.named_parameters())
    for name, param in fused.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:
            assert param.grad is None or not param.grad.any(), f"{what} {name}: gradient where eager has none"
        else:
            assert_close(param.grad, ref_grad, dtype, f"{what} grad {name}")
    ref_buffers = dict(reference_module.named_buffers())
    for name, buf in fused.named_buffers():
        if buf.is_floating_point():
            assert_close(buf, ref_buffers[name], dtype, f"{what} buffer {name}")
        else:
            assert torch.equal(buf, ref_buffers[name]), f"{what} buffer {name}"


def run_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Forward and backward; returns (output, input gradient)."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad
