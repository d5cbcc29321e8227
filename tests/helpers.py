"""Shared test helpers: random Ghost modules, the fused copy of a module, and comparisons with the reference."""

import copy
import math

import torch
import torch.nn as nn

import ghostfused
from ghostfused import backends, reference
from ghostfused.testing import randomize_batch_norms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

TOLERANCES = {  # (rtol, atol) for comparing a backend with the eager reference
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


class PlainSubclass(torch.Tensor):
    """A tensor subclass with no behaviour of its own: what the ops' shorter ways must not take for a plain tensor."""


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


def assert_step_matches(reference_module: nn.Module, fused: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                        dtype=torch.float64):
    """One forward and backward of each module: outputs and input gradients agree."""
    expected, expected_dx = run_step(reference_module, x, grad)
    actual, actual_dx = run_step(fused, x, grad)
    assert_close(actual, expected, dtype, "output")
    assert_close(actual_dx, expected_dx, dtype, "input gradient")


def _bn_lists(channels, dtype, device):
    """bn_weight, bn_bias, bn_mean, bn_var, bn_eps lists with non-trivial values, one BN per entry of channels."""
    lists = [[], [], [], [], []]
    for c in channels:
        lists[0].append(torch.rand(c, dtype=dtype, device=device) + 0.5)
        lists[1].append(torch.randn(c, dtype=dtype, device=device) * 0.2)
        lists[2].append(torch.randn(c, dtype=dtype, device=device) * 0.2)
        lists[3].append(torch.rand(c, dtype=dtype, device=device) + 0.5)
        lists[4].append(1e-5)
    return lists


def op_arguments(op, n, cin, oup, H, W, training, *, k=5, dw=3, ratio=2, relu=True, upsample="nearest",
                 dtype=torch.float64, channels_last=False, device=None):
    """The schema arguments (without backend; sync_group None) of ``op`` for random tensors of the given sizes, on
    ``device`` (default: the GPU when there is one)."""
    device = device or DEVICE
    init = math.ceil(oup / ratio)
    new = init * (ratio - 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=dtype, device=device) * scale

    x = randn(n, cin, H, W).contiguous(memory_format=fmt)
    primary = (randn(init, cin, 1, 1, scale=0.5), randn(new, 1, dw, dw, scale=0.3))
    dfc = (randn(oup, cin, 1, 1, scale=0.5), randn(oup, 1, 1, k, scale=0.4), randn(oup, 1, k, 1, scale=0.4))
    if op == "ghost_concat":
        return [x, *primary, *_bn_lists((init, new), dtype, device), oup, relu, training, None]
    if op == "dfc_attention":
        features = randn(n, oup, H, W).contiguous(memory_format=fmt)
        return [x, features, *dfc, *_bn_lists((oup,) * 3, dtype, device), upsample, training, None]
    return [x, *primary, *dfc, *_bn_lists((init, new, oup, oup, oup), dtype, device), oup, relu, upsample, training,
            None]
