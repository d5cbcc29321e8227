"""Property tests: random configurations of the fused modules and ops on every backend against the eager reference.

Each example draws N (0 to 4), channels (1 to 48, odd included), H and W (2 to 37, odd, non-square), the DFC kernel
size, the cheap kernel size and ratio, the upsampling mode, ReLU or not, train or eval, the input layout (dense,
channels_last, a non-dense view) and the dtype (float64, float32); forward, input and parameter gradients, running
statistics and the output's layout must match eager PyTorch computing in float64 on the same values.

Lower-precision training cases whose DFC BatchNorms see two values per channel run in float64 (``_well_posed``).

The "ci" hypothesis profile (the default, tests/conftest.py) runs a few derandomized examples; the long fuzzing run
is ``pytest tests/test_fuzz.py --hypothesis-profile=long``. A backend that runs in an interpreter (Triton without a
GPU) gets smaller shapes and a fifth of the examples.
"""

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from ghostfused import ops, reference  # noqa: E402

from helpers import cpu_backends, fused_copy, ghost_module  # noqa: E402
from reliability_helpers import LAYOUTS, assert_close_to_truth, interpreted, with_layout  # noqa: E402


@dataclass(frozen=True)
class Limits:
    batch: int
    channels: int
    size: int
    examples: float  # share of the profile's max_examples


NATIVE = Limits(batch=4, channels=48, size=37, examples=1.0)
# Under the interpreter a launch covers up to 256 pixels and 16 to 64 channels per program: these sizes keep every
# launch at a few programs.
INTERPRETER = Limits(batch=2, channels=8, size=9, examples=0.2)


def limits_for(backend: str) -> Limits:
    return INTERPRETER if interpreted(backend) else NATIVE


def run_examples(backend: str, strategy, check) -> None:
    """Run ``check(case, backend)`` on examples of ``strategy`` under the current profile, scaled for the backend."""
    examples = max(1, round(settings.default.max_examples * limits_for(backend).examples))

    @settings(max_examples=examples)
    @given(case=strategy)
    def run(case):
        check(case, backend)

    run()


@dataclass(frozen=True)
class ModuleCase:
    n: int
    inp: int
    oup: int
    h: int
    w: int
    mode: str
    ratio: int
    dw_size: int
    dfc_kernel_size: int
    upsample: str
    relu: bool
    training: bool
    layout: str
    dtype: torch.dtype
    seed: int


@st.composite
def module_cases(draw, limits: Limits) -> ModuleCase:
    return ModuleCase(
        n=draw(st.integers(0, limits.batch)), inp=draw(st.integers(1, limits.channels)),
        oup=draw(st.integers(1, limits.channels)), h=draw(st.integers(2, limits.size)),
        w=draw(st.integers(2, limits.size)), mode=draw(st.sampled_from(["original", "attn"])),
        ratio=draw(st.sampled_from([2, 3])), dw_size=draw(st.sampled_from([1, 3, 5])),
        dfc_kernel_size=draw(st.sampled_from([1, 3, 5, 7, 9, 15])),
        upsample=draw(st.sampled_from(reference.UPSAMPLE_MODES)), relu=draw(st.booleans()),
        training=draw(st.booleans()), layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])), seed=draw(st.integers(0, 2**31 - 1)))


def _pooled_count(n: int, h: int, w: int) -> int:
    return n * (h // 2) * (w // 2)


def _well_posed(case):
    """``case``, in float64 when it is a lower-precision training case whose DFC BatchNorms see two values per
    channel. Over two values a BatchNorm's input gradient is zero up to eps terms, and every gradient upstream of it
    is ill-conditioned: rounding noise of its terms amplified by 1 / sigma, which no float32 summation order (eager
    PyTorch's included) keeps near the float64 truth. In float64 the same configuration is compared at float64's
    tolerance."""
    has_dfc = getattr(case, "mode", "attn") == "attn"
    if case.training and has_dfc and case.dtype != torch.float64 and _pooled_count(case.n, case.h, case.w) == 2:
        return dataclasses.replace(case, dtype=torch.float64)
    return case


def _assert_state_matches(truth: nn.Module, fused: nn.Module, dtype: torch.dtype, eager: nn.Module | None) -> None:
    """Parameter gradients and buffers of ``fused`` (in ``dtype``) against those of the float64 ``truth`` (and of
    ``eager``, the eager module in ``dtype``, for its rounding errors: see ``assert_close_to_truth``)."""
    truth_params = dict(truth.named_parameters())
    eager_params = dict(eager.named_parameters()) if eager is not None else {}
    for name, param in fused.named_parameters():
        expected = truth_params[name].grad
        if expected is None:
            assert param.grad is None or not param.grad.any(), f"gradient of {name} where eager has none"
        else:
            assert param.grad is not None, f"no gradient of {name}"
            assert param.grad.dtype == param.dtype, f"gradient of {name} has dtype {param.grad.dtype}"
            eager_grad = eager_params[name].grad if eager is not None else None
            assert_close_to_truth(param.grad, expected, dtype, f"gradient of {name}", eager_grad)
    truth_buffers = dict(truth.named_buffers())
    eager_buffers = dict(eager.named_buffers()) if eager is not None else {}
    for name, buf in fused.named_buffers():
        if buf.is_floating_point():
            assert_close_to_truth(buf, truth_buffers[name], dtype, f"buffer {name}", eager_buffers.get(name))
        else:
            assert torch.equal(buf, truth_buffers[name]), f"buffer {name}: {buf} != {truth_buffers[name]}"


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward with ``x`` as given (its strides kept); returns (output, input gradient)."""
    x = x.detach().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad


def check_module_case(case: ModuleCase, backend: str) -> None:
    case = _well_posed(case)
    torch.manual_seed(case.seed)
    module = ghost_module(case.inp, case.oup, mode=case.mode, dtype=case.dtype, ratio=case.ratio,
                          dw_size=case.dw_size, dfc_kernel_size=case.dfc_kernel_size, upsample=case.upsample,
                          relu=case.relu).train(case.training)
    truth = copy.deepcopy(module).double()
    eager = module if case.dtype != torch.float64 else None  # eager in the case's dtype, for its rounding errors
    fused = fused_copy(module, backend)
    x = with_layout(torch.randn(case.n, case.inp, case.h, case.w, dtype=case.dtype), case.layout)
    grad = torch.randn(case.n, case.oup, case.h, case.w, dtype=case.dtype)
    if case.training and case.mode == "attn" and _pooled_count(case.n, case.h, case.w) == 1:
        for m in (truth, fused):  # one value per channel in the DFC BatchNorms: both refuse to train
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                m(x.to(next(m.parameters()).dtype))
        return
    expected, expected_dx = _step(truth, x.double(), grad.double())
    actual, actual_dx = _step(fused, x, grad)
    eager_out, eager_dx = _step(eager, x, grad) if eager is not None else (None, None)
    assert actual.dtype == case.dtype and actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=reference.memory_format_of(x)), "output layout"
    assert_close_to_truth(actual, expected, case.dtype, "output", eager_out)
    assert_close_to_truth(actual_dx, expected_dx, case.dtype, "input gradient", eager_dx)
    _assert_state_matches(truth, fused, case.dtype, eager)


@pytest.mark.parametrize("backend", cpu_backends())
def test_module_matches_eager(backend):
    run_examples(backend, module_cases(limits_for(backend)), check_module_case)


@dataclass(frozen=True)
class DfcCase:
    n: int
    inp: int
    channels: int
    h: int
    w: int
    kernel_size: int
    upsample: str
    training: bool
    x_layout: str
    features_layout: str
    dtype: torch.dtype
    seed: int


@st.composite
def dfc_cases(draw, limits: Limits) -> DfcCase:
    return DfcCase(
        n=draw(st.integers(0, limits.batch)), inp=draw(st.integers(1, limits.channels)),
        channels=draw(st.integers(1, limits.channels)), h=draw(st.integers(2, limits.size)),
        w=draw(st.integers(2, limits.size)), kernel_size=draw(st.sampled_from([1, 3, 5, 7, 9, 15])),
        upsample=draw(st.sampled_from(reference.UPSAMPLE_MODES)), training=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)), features_layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])), seed=draw(st.integers(0, 2**31 - 1)))


def _eager_dfc(short: nn.Module, x, features, grad, case: DfcCase, dtype: torch.dtype):
    """The DFC attention composed of eager modules in ``dtype``: (output, (x gradient, features gradient))."""
    x = x.detach().to(dtype).requires_grad_()
    features = features.detach().to(dtype).requires_grad_()
    gate = reference._upsample(torch.sigmoid(short(F.avg_pool2d(x, kernel_size=2, stride=2))), (case.h, case.w),
                               case.upsample)
    out = features * gate
    out.backward(grad.to(dtype))
    return out.detach(), (x.grad, features.grad)


def check_dfc_case(case: DfcCase, backend: str) -> None:
    case = _well_posed(case)
    torch.manual_seed(case.seed)
    short = ghost_module(case.inp, case.channels, mode="attn", dfc_kernel_size=case.kernel_size,
                         dtype=case.dtype).short_conv.train(case.training)
    truth = copy.deepcopy(short).double()
    eager = copy.deepcopy(short) if case.dtype != torch.float64 else None
    x = with_layout(torch.randn(case.n, case.inp, case.h, case.w, dtype=case.dtype), case.x_layout)
    features = with_layout(torch.randn(case.n, case.channels, case.h, case.w, dtype=case.dtype),
                           case.features_layout)
    grad = torch.randn(case.n, case.channels, case.h, case.w, dtype=case.dtype)
    x.requires_grad_()
    features.requires_grad_()

    def fused_op():
        return ops.dfc_attention(x, features, short[0].weight, short[1], short[2].weight, short[3],
                                 short[4].weight, short[5], upsample=case.upsample, training=case.training,
                                 backend=backend)

    if case.training and _pooled_count(case.n, case.h, case.w) == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fused_op()
        return
    out = fused_op()
    out.backward(grad)
    expected, expected_grads = _eager_dfc(truth, x, features, grad, case, torch.float64)
    eager_out, eager_grads = _eager_dfc(eager, x, features, grad, case, case.dtype) if eager is not None else \
        (None, (None, None))
    assert out.dtype == case.dtype
    assert out.is_contiguous(memory_format=reference.memory_format_of(x)), "output layout"
    assert_close_to_truth(out.detach(), expected, case.dtype, "output", eager_out)
    assert_close_to_truth(x.grad, expected_grads[0], case.dtype, "x gradient", eager_grads[0])
    assert_close_to_truth(features.grad, expected_grads[1], case.dtype, "features gradient", eager_grads[1])
    _assert_state_matches(truth, short, case.dtype, eager)


@pytest.mark.parametrize("backend", cpu_backends())
def test_dfc_attention_matches_eager(backend):
    run_examples(backend, dfc_cases(limits_for(backend)), check_dfc_case)
