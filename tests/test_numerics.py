"""Numerical edges, on every backend against eager PyTorch in the same dtype:

* large magnitudes (the DFC gate's sigmoid saturates; BatchNorm statistics of values near 1e18, whose squares
  overflow float32; a large common offset, where E[x^2] - E[x]^2 cancels): no NaN or Inf where eager has none, and
  eager's values;
* NaN and +-Inf in the input: NaN and Inf at the same output positions as eager, eager's values elsewhere;
* float16 near its overflow (65504), in eval and training mode, and float16 infinities: as eager. Eager PyTorch has
  float16 convolutions on the CPU, so this runs on the CPU backends here and on the CUDA ones in GPU-marked tests;
  an interpreted backend skips it (Triton's interpreter is tested in float32 and float64, ENV.md).
"""

import copy

import pytest
import torch

from ecosystem_helpers import requires_cuda
from helpers import TOLERANCES, fused_copy, ghost_module
from reliability_helpers import assert_close_to_truth, backend_devices, interpreted

N, CIN, OUP, H, W = 2, 5, 7, 9, 10
MODES = ["original", "attn"]


def _module(mode, dtype, training, device, upsample="nearest"):
    return ghost_module(CIN, OUP, mode=mode, dtype=dtype, upsample=upsample).train(training).to(device)


def _forward_backward(module, x, grad):
    module = copy.deepcopy(module)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad, module


def _assert_same_non_finite(actual, expected, what):
    for mask, name in ((torch.isnan, "NaN"), (torch.isposinf, "+Inf"), (torch.isneginf, "-Inf")):
        a, e = mask(actual), mask(expected)
        assert torch.equal(a, e), (f"{what}: {name} at {int(a.sum())} positions, eager at {int(e.sum())}; "
                                   f"first difference at {(a != e).nonzero()[0].tolist()}")


def _assert_finite_close(actual, expected, dtype, what):
    finite = torch.isfinite(expected)
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


CPU_BACKENDS = [b for b, d in backend_devices() if d == "cpu"]
CUDA_BACKENDS = [b for b, d in backend_devices() if d == "cuda"]


# ---------------------------------------------------------------------------------------------------------------
# Large magnitudes.

LARGE = {  # name -> input from a standard normal sample
    "saturating-gate-1e4": lambda z: 1e4 * z,
    "huge-1e15": lambda z: 1e15 * z,
    "squares-overflow-1e18": lambda z: 1e18 * z,  # batch statistics only: eval would overflow eager's output too
    "offset-1e3": lambda z: 1e3 + z,  # the batch variance cancels
}
LARGE_CASES = [pytest.param(name, training, id=f"{name}-{'train' if training else 'eval'}")
               for name in LARGE for training in (True, False) if training or name.startswith(("saturating", "huge"))]


def check_large(backend, device, mode, name, training):
    make = LARGE[name]
    torch.manual_seed(0)
    module = _module(mode, torch.float32, training, device)
    fused = fused_copy(module, backend)
    x = make(torch.randn(N, CIN, H, W, device=device))
    grad = torch.randn(N, OUP, H, W, device=device)
    truth_out, truth_dx, truth = _forward_backward(copy.deepcopy(module).double(), x.double(), grad.double())
    eager_out, eager_dx, eager = _forward_backward(module, x, grad)
    out, dx, fused = _forward_backward(fused, x, grad)
    for what, a, e, t in (("output", out, eager_out, truth_out), ("input gradient", dx, eager_dx, truth_dx)):
        assert torch.isfinite(e).all(), f"eager float32 gives non-finite {what}: the case does not test anything"
        assert torch.isfinite(a).all(), f"{what}: {int((~torch.isfinite(a)).sum())} non-finite values"
        assert_close_to_truth(a, t, torch.float32, what, e)
    eager_buffers = dict(eager.named_buffers())
    for buf_name, t in truth.named_buffers():
        if t.is_floating_point():
            buf = dict(fused.named_buffers())[buf_name]
            assert torch.isfinite(buf).all(), f"buffer {buf_name} is not finite"
            assert_close_to_truth(buf, t, torch.float32, f"buffer {buf_name}", eager_buffers[buf_name])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, training", LARGE_CASES)
def test_large_magnitudes(backend, mode, name, training):
    check_large(backend, "cpu", mode, name, training)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name, training", LARGE_CASES)
def test_large_magnitudes_on_gpu(monkeypatch, backend, mode, name, training):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 as float32, for eager too
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    check_large(backend, "cuda", mode, name, training)


# ---------------------------------------------------------------------------------------------------------------
# NaN and Inf in the input.


def _with_non_finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a NaN, a +Inf and a -Inf in sample 0 (at an edge, a corner and inside), sample 1 finite."""
    x = x.clone()
    x[0, 0, 0, 3] = float("nan")
    x[0, 1, 4, 4] = float("inf")
    x[0, 2, H - 1, W - 1] = float("-inf")
    return x


def check_non_finite(backend, device, mode, dtype, training, upsample):
    torch.manual_seed(0)
    module = _module(mode, dtype, training, device, upsample)
    fused = fused_copy(module, backend)
    x = _with_non_finite(torch.randn(N, CIN, H, W, dtype=dtype, device=device))
    with torch.no_grad():
        expected = module(x)
        actual = fused(x)
    _assert_same_non_finite(actual, expected, "output")
    _assert_finite_close(actual, expected, dtype, "finite outputs")
    for (name, buf), (_, ref) in zip(fused.named_buffers(), module.named_buffers()):
        if buf.is_floating_point():
            _assert_same_non_finite(buf, ref, f"buffer {name}")
            _assert_finite_close(buf, ref, dtype, f"buffer {name}")


MODE_UPSAMPLE = [("original", "nearest"), ("attn", "nearest"), ("attn", "bilinear")]  # no gate in 'original'


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode, upsample", MODE_UPSAMPLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_nan_and_inf_propagate_as_eager(backend, mode, upsample, dtype, training):
    check_non_finite(backend, "cpu", mode, dtype, training, upsample)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("mode, upsample", MODE_UPSAMPLE)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_nan_and_inf_propagate_as_eager_on_gpu(backend, mode, upsample, training):
    check_non_finite(backend, "cuda", mode, torch.float32, training, upsample)


# ---------------------------------------------------------------------------------------------------------------
# float16 near overflow.

HALF_MAX = 65504.0


def _bounded_half_module(mode, training, device):
    """A float16 module whose convolutions and BatchNorms never amplify: each output is a weighted mean of its inputs
    (|weights| summing to at most 1) and the BatchNorms are near the identity, so inputs near 65504 give outputs near
    it, without overflow in eager's float16 intermediates."""
    module = _module(mode, torch.float32, training, device)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight.abs() + 0.1
                m.weight.copy_(w / w.flatten(1).sum(1).view(-1, 1, 1, 1) * torch.sign(torch.randn_like(w)))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return module.half()


def check_half(backend, device, mode, training, case):
    if interpreted(backend):
        pytest.skip("float16 is tested on a GPU for an interpreted backend")
    torch.manual_seed(0)
    module = _bounded_half_module(mode, training, device)
    fused = fused_copy(module, backend)
    z = torch.rand(N, CIN, H, W, device=device) * 2 - 1
    x = (0.95 * HALF_MAX * z).half()
    if case == "infinities":
        x = _with_non_finite(x)
    # Small output gradients: features near 65504 times the gradient must not overflow in eager's float16 backward.
    grad = (0.1 * torch.randn(N, OUP, H, W, device=device)).half()
    expected, expected_dx, _ = _forward_backward(module, x, grad)
    actual, actual_dx, _ = _forward_backward(fused, x, grad)
    assert actual.dtype == torch.float16
    _assert_same_non_finite(actual, expected, "output")
    _assert_finite_close(actual.float(), expected.float(), torch.float16, "finite outputs")
    if case == "near-overflow":
        assert torch.isfinite(expected).all() and torch.isfinite(expected_dx).all(), "eager overflowed"
        assert torch.isfinite(actual_dx).all(), "input gradient overflowed where eager's did not"
        _assert_finite_close(actual_dx.float(), expected_dx.float(), torch.float16, "input gradient")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", ["near-overflow", "infinities"])
def test_float16_as_eager(backend, mode, training, case):
    check_half(backend, "cpu", mode, training, case)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", ["near-overflow", "infinities"])
def test_float16_as_eager_on_gpu(backend, mode, training, case):
    check_half(backend, "cuda", mode, training, case)
