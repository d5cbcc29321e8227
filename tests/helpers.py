"""Shared test helpers: random Ghost modules, the fused copy of a module, and comparisons with the reference."""

import copy
import math
import socket

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


NOTHING_SAVED = torch.empty(0)  # the `saved` argument of a backend backward that recomputes everything


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


def full_size_copies(op, args, grad_layout, forward, backward):
    """The copies of tensors with at least N * H * W elements that a backend's raw kernels make in one
    forward(*args) -> (out, mean, var, saved) and one backward(grad_out, saved, *args) (grad_out in ``grad_layout``),
    as the profiler records the ATen calls inside them; and the output and the gradients of the full-resolution
    inputs."""
    b = bn_index(op)
    n, _, h, w = args[0].shape
    with torch.profiler.profile(record_shapes=True) as forward_profile:
        out, mean, var, saved = forward(*args)
    sizes = [t.shape[0] for t in args[b]]
    args = args[:b + 2] + [list(mean.split(sizes)), list(var.split(sizes))] + args[b + 4:]
    grad = torch.randn(out.shape, dtype=out.dtype, device=out.device).contiguous(memory_format=grad_layout)
    with torch.profiler.profile(record_shapes=True) as backward_profile:
        grads = backward(grad, saved, *args)
    copies = ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous")
    found = [(e.name, e.input_shapes) for p in (forward_profile, backward_profile) for e in p.events()
             if e.name in copies and any(isinstance(s, list) and s and math.prod(s) >= n * h * w
                                         for s in e.input_shapes)]
    return found, [out, *grads[:2 if op == "dfc_attention" else 1]]


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bn_index(op) -> int:
    """Position of the bn_weight list in the op's schema arguments."""
    return {"ghost_concat": 3, "dfc_attention": 5, "ghost_attn": 6}[op]


def _in_float32(value):
    """Half-precision tensors (and lists of them) in float32; anything else as it is."""
    if isinstance(value, list):
        return [_in_float32(v) for v in value]
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def compare_op_with_reference(op, args, dtype, forward, backward, scale=1.0):
    """A backend's op against the eager backend: forward(*args) -> (out, stats_mean, stats_var) (output, statistics,
    layout) and backward(grad_out, *args) -> every gradient of the schema.

    In float16 / bfloat16 the BatchNorm parameters and statistics are float32 (as autocast keeps them) and the
    reference runs in float32 on the same rounded values; the variances are compared at 4x the dtype's tolerance,
    and each gradient element may also be as far from the reference as twice eager's own in that dtype (a training
    BatchNorm's backward over few values amplifies the rounding of its half-precision input)."""
    half = dtype in (torch.float16, torch.bfloat16)
    b = bn_index(op)
    args = list(args)
    if half:
        args[b:b + 4] = _in_float32(args[b:b + 4])
    eager = backends.implementation("eager", op)
    reference_args = _in_float32(args)
    out, mean, var = forward(*args)
    ref_out, ref_mean, ref_var, _ = eager.forward(*reference_args)
    assert out.dtype == dtype and mean.dtype == ref_mean.dtype and var.dtype == ref_var.dtype
    assert_close(out.to(ref_out.dtype), ref_out, dtype, "output", scale)
    assert_close(mean, ref_mean, dtype, "stats_mean", scale)
    assert_close(var, ref_var, dtype, "stats_var", scale * (4 if half else 1))
    assert out.is_contiguous(memory_format=reference.memory_format_of(args[0]))
    grad = torch.randn_like(ref_out)
    sizes = [w.shape[0] for w in args[b]]
    backward_args, reference_backward_args = list(args), list(reference_args)
    for a in (backward_args, reference_backward_args):
        a[b + 2], a[b + 3] = list(ref_mean.split(sizes)), list(ref_var.split(sizes))
    actual = backward(grad.to(dtype), *backward_args)
    expected = eager.backward(grad, NOTHING_SAVED, *reference_backward_args)
    eager_in_dtype = eager.backward(grad.to(dtype), NOTHING_SAVED, *backward_args) if half else expected
    assert len(actual) == len(expected)
    for i, (a, e, h) in enumerate(zip(actual, expected, eager_in_dtype)):
        # the last two: BatchNorm gradients, in the stats dtype
        assert a.shape == e.shape and a.dtype == (e.dtype if i >= len(expected) - 2 else dtype), f"gradient {i}"
        rtol, atol = TOLERANCES[dtype]
        excess = (a.to(e.dtype) - e).abs() - (atol + rtol * e.abs()) * scale - 2 * (h.to(e.dtype) - e).abs()
        assert e.numel() == 0 or excess.max() <= 0, (
            f"gradient {i}: {int((excess > 0).sum())} of {e.numel()} elements off; the worst at "
            f"{tuple(int(k) for k in torch.unravel_index(excess.argmax(), e.shape))}: {a.flatten()[excess.argmax()]} "
            f"against {e.flatten()[excess.argmax()]} (eager in {dtype}: {h.flatten()[excess.argmax()]})")


# (n, cin, oup, H, W, options) of op_arguments: odd and non-square sizes, the 7x7 of the last stage, N = 1 and 3, the
# smallest pooled size (2x3), odd and even oup, K = 3 and 7, dw = 5, ratio 3, bilinear, no ReLU, channels_last.
OP_CASES = {
    "odd-5x7": (2, 3, 5, 5, 7, {}),
    "n1-7x7-k7": (1, 4, 6, 7, 7, dict(k=7)),
    "n3-4x9-bilinear": (3, 5, 4, 4, 9, dict(upsample="bilinear")),
    "2x3-k3-norelu": (2, 2, 3, 2, 3, dict(k=3, relu=False)),
    "9x6-ratio3-dw5": (2, 3, 7, 9, 6, dict(ratio=3, dw=5)),
    "channels-last-bilinear-odd": (2, 3, 5, 7, 5, dict(channels_last=True, upsample="bilinear", k=3)),
    "channels-last-6x8": (1, 4, 8, 6, 8, dict(channels_last=True)),
}


def case_arguments(op, case, training, **overrides):
    """op_arguments for OP_CASES[case], without the options op does not take."""
    n, cin, oup, H, W, options = OP_CASES[case]
    dropped = {"ghost_concat": ("k", "upsample"), "dfc_attention": ("dw", "ratio", "relu"), "ghost_attn": ()}[op]
    options = {key: value for key, value in {**options, **overrides}.items() if key not in dropped}
    return op_arguments(op, n, cin, oup, H, W, training, **options)
