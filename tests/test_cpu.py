"""The ``cpu`` backend beyond the generic suite: batch sizes and layouts, bitwise determinism across runs and thread
counts, options (K, dw, ratio, odd oup, bilinear), reduced precision, the shared host/device math of
``csrc/include/ghostfused`` against PyTorch, bad input to the raw ``torch.ops.ghostfused_C`` kernels, and the
extension's check that nothing observes a kernel call.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ghostfused
from ghostfused import ops

from helpers import (PlainSubclass, assert_close, assert_modules_match, full_size_copies, fused_copy, ghost_module,
                     op_arguments)

pytestmark = pytest.mark.skipif("cpu" not in ghostfused.available_backends(),
                                reason="the C++ extension with its cpu kernels is not built")

OPS = ["ghost_concat", "dfc_attention", "ghost_attn"]


def _module(op, cin, oup, dtype, **options):
    return ghost_module(cin, oup, mode="original" if op == "ghost_concat" else "attn", dtype=dtype, **options)


def _call(op, module, x, features, training):
    """The public op on ``module``'s parameters (dfc_attention gates ``features`` with module.short_conv)."""
    if op == "dfc_attention":
        s = module.short_conv
        return ops.dfc_attention(x, features, s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5],
                                 upsample=module.upsample, training=training, backend="cpu")
    p, c = module.primary_conv, module.cheap_operation
    relu = isinstance(p[2], torch.nn.ReLU)
    if op == "ghost_concat":
        return ops.ghost_concat(x, p[0].weight, p[1], c[0].weight, c[1], module.oup, relu=relu, training=training,
                                backend="cpu")
    s = module.short_conv
    return ops.ghost_attn(x, p[0].weight, p[1], c[0].weight, c[1], s[0].weight, s[1], s[2].weight, s[3],
                          s[4].weight, s[5], module.oup, relu=relu, upsample=module.upsample, training=training,
                          backend="cpu")


def _reference(op, module, x, features):
    if op == "dfc_attention":
        gate = torch.sigmoid(module.short_conv(F.avg_pool2d(x, 2)))
        mode = dict(mode="nearest") if module.upsample == "nearest" else dict(mode="bilinear", align_corners=False)
        return features * F.interpolate(gate, size=x.shape[-2:], **mode)
    return module(x)


def _step(op, module, x, features, grad, training, fused: bool):
    """Forward and backward of the cpu op (fused) or the eager reference; returns output and all gradients."""
    x = x.detach().clone().requires_grad_()
    features = features.detach().clone().requires_grad_()
    module.zero_grad()
    out = _call(op, module, x, features, training) if fused else _reference(op, module, x, features)
    out.backward(grad)
    grads = [x.grad] + ([features.grad] if op == "dfc_attention" else [])
    grads += [p.grad.clone() for p in module.parameters() if p.grad is not None]
    return out.detach(), grads


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_sizes_and_layouts(op, batch, channels_last, training):
    dtype = torch.float64
    module = _module(op, 4, 7, dtype).train(training)
    fused = fused_copy(module, "eager")  # the same parameters and running statistics, updated by the cpu op
    x = torch.randn(batch, 4, 9, 6, dtype=dtype)
    features = torch.randn(batch, 7, 9, 6, dtype=dtype)
    if channels_last:
        x, features = (t.contiguous(memory_format=torch.channels_last) for t in (x, features))
    grad = torch.randn(batch, 7, 9, 6, dtype=dtype)
    expected, expected_grads = _step(op, module, x, features, grad, training, fused=False)
    actual, actual_grads = _step(op, fused, x, features, grad, training, fused=True)
    assert actual.shape == expected.shape
    if batch > 0:
        assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(actual, expected, dtype, "output")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, dtype, "gradient")
    assert_modules_match(module, fused, dtype)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_input(op):
    module = _module(op, 3, 6, torch.float64).train()
    x = torch.randn(2, 3, 14, 7, dtype=torch.float64)[:, :, ::2]
    features = torch.randn(2, 6, 7, 7, dtype=torch.float64).transpose(2, 3)
    with torch.no_grad():
        expected = _reference(op, fused_copy(module, "eager"), x.contiguous(), features.contiguous())
        actual = _call(op, module, x, features, training=True)
    assert_close(actual, expected, torch.float64, "output")


@pytest.mark.parametrize("op", ["ghost_concat", "ghost_attn"])
@pytest.mark.parametrize("options", [dict(dw_size=1), dict(dw_size=5, ratio=3), dict(dw_size=7, ratio=4),
                                     dict(relu=False, ratio=3)], ids=["dw1", "dw5-ratio3", "dw7-ratio4", "norelu"])
@pytest.mark.parametrize("oup", [7, 8])
def test_ghost_options(op, options, oup):
    dtype = torch.float64
    module = _module(op, 3, oup, dtype, **options).train()
    fused = fused_copy(module, "eager")
    x = torch.randn(2, 3, 8, 11, dtype=dtype)
    grad = torch.randn(2, oup, 8, 11, dtype=dtype)
    expected, expected_grads = _step(op, module, x, x, grad, True, fused=False)
    actual, actual_grads = _step(op, fused, x, x, grad, True, fused=True)
    assert_close(actual, expected, dtype, "output")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, dtype, "gradient")


@pytest.mark.parametrize("op", ["ghost_concat", "ghost_attn"])
@pytest.mark.parametrize("options", [dict(), dict(dw_size=1), dict(dw_size=5, ratio=3), dict(dw_size=7, ratio=4),
                                     dict(relu=False, upsample="bilinear", dfc_kernel_size=3)],
                         ids=["default", "dw1", "dw5-ratio3", "dw7-ratio4", "norelu-bilinear-k3"])
@pytest.mark.parametrize("oup", [7, 8])
@pytest.mark.parametrize("shape", [(1, 9, 13), (3, 6, 5), (2, 2, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_forward_and_backward(op, options, oup, shape, dtype, training):
    """A channels_last x runs NHWC end to end in both modes (the GEMMs over all pixels, the DFC pool read NHWC,
    grad_out read NHWC): the output (NaN-poisoned channels_last), all gradients and the running statistics against
    the reference run in NCHW."""
    n, h, w = shape
    module = _module(op, 5, oup, dtype, **options).train(training)
    fused = fused_copy(module, "eager")
    x = torch.randn(n, 5, h, w, dtype=dtype)
    grad = torch.randn(n, oup, h, w, dtype=dtype)
    expected, expected_grads = _step(op, module, x, x, grad, training, fused=False)
    x_cl, grad_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    actual, actual_grads = _step(op, fused, x_cl, x_cl, grad_cl, training, fused=True)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_close(actual, expected, dtype, "output")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, dtype, "gradient")
    assert_modules_match(module, fused, dtype)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("shape", [(1, 9, 13), (3, 6, 5), (2, 2, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("features_layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dfc_attention_channels_last(upsample, kernel, shape, features_layout, dtype, training):
    """dfc_attention with a channels_last x runs NHWC in both modes (features converted if they are not): output,
    all gradients and running statistics against the reference, into NaN-poisoned outputs."""
    n, h, w = shape
    module = _module("dfc_attention", 5, 7, dtype, dfc_kernel_size=kernel, upsample=upsample).train(training)
    fused = fused_copy(module, "eager")
    x = torch.randn(n, 5, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    features = torch.randn(n, 7, h, w, dtype=dtype)
    if features_layout == "channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, 7, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    expected, expected_grads = _step("dfc_attention", module, x, features, grad, training, fused=False)
    actual, actual_grads = _step("dfc_attention", fused, x, features, grad, training, fused=True)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_close(actual, expected, dtype, "output")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, dtype, "gradient")
    assert_modules_match(module, fused, dtype)


RAW_OPS = {op: (getattr(torch.ops.ghostfused_C, f"{op}_forward"), getattr(torch.ops.ghostfused_C, f"{op}_backward"))
           for op in OPS}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_kernels_make_no_layout_copy(op, training, channels_last):
    """Inside the raw kernels, no tensor of full resolution is copied, in either layout: x, features and grad_out are
    read where they are, the output and the input gradients written in x's layout. (The check sees copies: a
    grad_out in the other layout is converted, and that copy is found.)"""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    args = op_arguments(op, 2, 5, 7, 9, 6, training, dtype=torch.float32, channels_last=channels_last, device="cpu")
    copies, results = full_size_copies(op, args, layout, *RAW_OPS[op])
    assert copies == []
    assert all(t.is_contiguous(memory_format=layout) for t in results), "a result is not in x's layout"
    other = torch.contiguous_format if channels_last else torch.channels_last
    assert full_size_copies(op, args, other, *RAW_OPS[op])[0] != []


@pytest.mark.parametrize("op", ["dfc_attention", "ghost_attn"])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9, 11, 13, 15])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_dfc_kernel_sizes_and_upsampling(op, kernel, upsample):
    dtype = torch.float64
    module = _module(op, 3, 5, dtype, dfc_kernel_size=kernel, upsample=upsample).train()
    fused = fused_copy(module, "eager")
    x = torch.randn(2, 3, 13, 10, dtype=dtype)  # gate 6x5: smaller than the larger kernels
    features = torch.randn(2, 5, 13, 10, dtype=dtype)
    grad = torch.randn(2, 5, 13, 10, dtype=dtype)
    expected, expected_grads = _step(op, module, x, features, grad, True, fused=False)
    actual, actual_grads = _step(op, fused, x, features, grad, True, fused=True)
    assert_close(actual, expected, dtype, "output")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, dtype, "gradient")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float32_and_reduced_precision(op, dtype):
    module = _module(op, 6, 10, torch.float32).eval()
    x = torch.randn(2, 6, 12, 9)
    features = torch.randn(2, 10, 12, 9)
    with torch.no_grad():
        expected = _reference(op, module, x, features)
        low = fused_copy(module, "eager").to(dtype)
        actual = _call(op, low, x.to(dtype), features.to(dtype), training=False)
    assert actual.dtype == dtype
    assert_close(actual.float(), expected, dtype, "output")


# (Cin, oup, H, W) of the determinism test. Large planes: > 4096 positions per sample (several weight-gradient
# chunks) and 71 channels (several DFC channel blocks at 2 threads, one at 1 thread). Small planes with many
# channels: the shape of ghostnetv2's last stages, where a library GEMM is most tempted to split its reduction
# over threads (oneDNN's 1x1 convolution does, and was rejected for that: see csrc/cpu/common.cpp).
DETERMINISM_SHAPES = {"large-planes": (8, 71, 70, 66), "small-planes-many-channels": (128, 256, 9, 13)}


def _run_all(op, threads, shape, layout, seed=0):
    """Outputs, gradients and running statistics of two training steps and one eval step, at ``threads``, with x,
    features and grad_out in ``layout``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        cin, oup, h, w = DETERMINISM_SHAPES[shape]
        module = _module(op, cin, oup, torch.float32, dfc_kernel_size=5).train()
        x, features, grad = (torch.randn(3, c, h, w).contiguous(memory_format=layout) for c in (cin, oup, oup))
        results = []
        for training in (True, True, False):
            module.train(training)
            out, grads = _step(op, module, x, features, grad, training, fused=True)
            results += [out, *grads]
        results += [b.clone() for b in module.buffers()]
        return results
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wide_modules_at_two_threads(op, batch, training):
    """Many channels at 2 threads: the quarter-resolution passes split channels into several blocks per sample."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dtype = torch.float64
        module = _module(op, 24, 72, dtype).train(training)
        fused = fused_copy(module, "eager")
        x = torch.randn(batch, 24, 16, 14, dtype=dtype)
        features = torch.randn(batch, 72, 16, 14, dtype=dtype)
        grad = torch.randn(batch, 72, 16, 14, dtype=dtype)
        expected, expected_grads = _step(op, module, x, features, grad, training, fused=False)
        actual, actual_grads = _step(op, fused, x, features, grad, training, fused=True)
        assert_close(actual, expected, dtype, "output")
        for a, e in zip(actual_grads, expected_grads):
            assert_close(a, e, dtype, "gradient")
        assert_modules_match(module, fused, dtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_many_channels_on_small_planes_in_float32(op, training):
    """float32 at batch 3, 128 -> 256 channels on 9x13 planes: wide 1x1 convolutions (forward and transposed) on
    few pixels, the regime of ghostnetv2's last stages."""
    module = _module(op, 128, 256, torch.float32).train(training)
    fused = fused_copy(module, "eager")
    x, features, grad = torch.randn(3, 128, 9, 13), torch.randn(3, 256, 9, 13), torch.randn(3, 256, 9, 13)
    expected, expected_grads = _step(op, module, x, features, grad, training, fused=False)
    actual, actual_grads = _step(op, fused, x, features, grad, training, fused=True)
    assert_close(actual, expected, torch.float32, "output")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, torch.float32, "gradient")
    assert_modules_match(module, fused, torch.float32)


@pytest.mark.parametrize("op", ["dfc_attention", "ghost_attn"])
@pytest.mark.parametrize("width", [4, 7, 8, 14, 16, 18, 24, 34, 9, 15, 35])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gate_upsampling_at_every_width_in_float32(op, width, training):
    """The gate's nearest upsampling in float32 (vectorised there) at widths whose gate rows double by unpacks of 8
    and 4 columns and a scalar tail, and at odd widths, which gather (width 35: a 2 x 17 gate) or, for gates of at
    most 16 values with AVX-512, permute a register (widths 7, 9, 15: 75 pixels, a masked tail): forward and
    gradients against eager."""
    module = _module(op, 6, 20, torch.float32).train(training)
    fused = fused_copy(module, "eager")
    x, features, grad = torch.randn(2, 6, 5, width), torch.randn(2, 20, 5, width), torch.randn(2, 20, 5, width)
    expected, expected_grads = _step(op, module, x, features, grad, training, fused=False)
    actual, actual_grads = _step(op, fused, x, features, grad, training, fused=True)
    assert_close(actual, expected, torch.float32, "output")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, torch.float32, "gradient")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", DETERMINISM_SHAPES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bitwise_deterministic_across_runs_and_thread_counts(op, shape, layout):
    one = _run_all(op, threads=1, shape=shape, layout=layout)
    two = _run_all(op, threads=2, shape=shape, layout=layout)
    again = _run_all(op, threads=2, shape=shape, layout=layout)
    assert len(one) == len(two) == len(again)
    for i, (a, b, c) in enumerate(zip(one, two, again)):
        assert torch.equal(b, c), f"result {i} differs between two runs"
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("op", ["ghost_concat", "ghost_attn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_saved_primary_output_gives_the_recomputed_gradients(op, dtype, channels_last):
    """A training forward returns y1 (flat, in the compute dtype) as ``saved``; the backward reading it gives bitwise
    the gradients of a backward that recomputes it, and refuses a ``saved`` of the wrong size."""
    args = op_arguments(op, 3, 5, 7, 6, 9, True, dtype=dtype, channels_last=channels_last, device="cpu")
    forward, backward = getattr(torch.ops.ghostfused_C, f"{op}_forward"), getattr(torch.ops.ghostfused_C,
                                                                                 f"{op}_backward")
    out, mean, var, saved = forward(*args)
    init = args[1].shape[0]
    assert saved.shape == (3 * init * 6 * 9,)
    assert saved.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    b = 3 if op == "ghost_concat" else 6
    sizes = [w.shape[0] for w in args[b]]
    args[b + 2], args[b + 3] = list(mean.split(sizes)), list(var.split(sizes))
    grad = torch.randn_like(out)  # in out's layout
    with_saved = backward(grad, saved, *args)
    recomputed = backward(grad, torch.empty(0), *args)
    for i, (a, r) in enumerate(zip(with_saved, recomputed)):
        assert torch.equal(a, r), f"gradient {i}"
    assert forward(*args[:-2], False, None)[3].numel() == 0  # eval saves nothing
    with pytest.raises(RuntimeError, match="saved must be the primary convolution's output"):
        backward(grad, saved[1:], *args)


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_kernel_call_allowed_agrees_with_the_python_checks():
    """``ghostfused.ops.direct.kernel_call_allowed`` (the extension's ``unobserved_kernel_call`` after the Python
    state) allows a kernel call exactly when ``unobserved`` holds and autocast is off on x's device: plain calls with
    and without grad mode, parameters needing gradients, tensor subclasses (inside lists too), arguments of other
    types, a dispatch mode, a functorch transform, the jit tracer and autocast."""
    from ghostfused.ops import direct

    x = torch.randn(2, 3)
    param = torch.nn.Parameter(torch.randn(3))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    cases = [(x, frozen, [x, frozen], [1e-5, 0.1], 3, True, "nearest", None), (x, param, [x], 4, False, None),
             (x.as_subclass(PlainSubclass), frozen), (x, [x, x.as_subclass(PlainSubclass)]), (x, (x,)), (x, object()),
             (x, [[x]])]

    def verdicts():
        return [(direct.kernel_call_allowed(args), direct.unobserved(args) and not torch.is_autocast_enabled("cpu"))
                for args in cases]

    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            seen = verdicts()
            assert all(kernel == python for kernel, python in seen), seen
            assert seen[0] == (True, True) and seen[1][0] is not grad
    for context in (_Mode, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        with torch.no_grad(), context():
            assert verdicts() == [(False, False)] * len(cases)
    traced = []
    torch.jit.trace(lambda t: traced.append(verdicts()) or t * 2, (x,))
    assert traced[0] == [(False, False)] * len(cases)
    transformed = []
    torch.func.vmap(lambda row: transformed.append(direct.kernel_call_allowed((row,))) or row)(x)
    assert transformed == [False] and direct.kernel_call_allowed((x,))
    assert direct.kernel_call_allowed((x.to("meta"), frozen))  # a device without autocast


# ----------------------------------------------------------------------------------------------------------------
# The shared host/device math (csrc/include/ghostfused), through the test hooks of ghostfused._C.


def _ext():
    from ghostfused import backends
    return backends.extension()


SIZES = [(h, out) for h in range(1, 17) for out in sorted({h, h + 1, 2 * h, 2 * h + 1, 3 * h + 2, 7 * h - 1})]
SIZES += [(3, 7), (7, 14), (14, 28), (28, 56), (56, 112), (56, 113), (25, 51), (33, 200), (100, 301)]


@pytest.mark.parametrize("in_size, out_size", SIZES)
def test_nearest_index_map_matches_pytorch(in_size, out_size):
    source = torch.arange(in_size, dtype=torch.float64).view(1, 1, in_size, 1)
    expected = F.interpolate(source, size=(out_size, 1), mode="nearest").flatten().long().tolist()
    actual = [_ext()._nearest_source_index(i, in_size, out_size) for i in range(out_size)]
    assert actual == expected


@pytest.mark.parametrize("in_size, out_size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bilinear_taps_match_pytorch(in_size, out_size, dtype):
    # Row s of the interpolation matrix: the upsampling of the one-hot input e_s.
    eye = torch.eye(in_size, dtype=dtype).view(in_size, 1, in_size, 1)
    expected = F.interpolate(eye, size=(out_size, 1), mode="bilinear", align_corners=False).view(in_size, out_size).t()
    actual = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i, (i0, i1, w0, w1) in enumerate(_ext()._bilinear_taps(in_size, out_size, dtype == torch.float64)):
        assert 0 <= i0 <= i1 < in_size
        actual[i, i0] += w0
        actual[i, i1] += w1
    torch.testing.assert_close(actual, expected.double(), rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("size", range(2, 41))
def test_pooled_size_matches_avg_pool(size):
    assert _ext()._pooled_size(size) == F.avg_pool2d(torch.zeros(1, 1, size, size), 2).shape[-1]


@pytest.mark.parametrize("k", [1, 3, 5, 7, 15])
@pytest.mark.parametrize("size", [1, 2, 3, 6, 17])
def test_tap_ranges_agree(k, size):
    for i in range(size):
        lo, hi = _ext()._tap_range(i, size, k)
        expected = [t for t in range(k) if 0 <= i + t - k // 2 < size]
        assert list(range(lo, hi)) == expected
    for t in range(k):
        lo, hi = _ext()._tap_outputs(t, size, k)
        assert list(range(lo, hi)) == [i for i in range(size) if 0 <= i + t - k // 2 < size]


@pytest.mark.parametrize("kh, kw", [(1, 1), (3, 3), (1, 5), (7, 1), (5, 5), (15, 1), (1, 15)])
@pytest.mark.parametrize("height, width", [(1, 1), (2, 7), (6, 5), (9, 13)])
def test_depthwise_taps_match_conv2d(kh, kw, height, width):
    plane, taps = torch.randn(height, width, dtype=torch.float64), torch.randn(kh, kw, dtype=torch.float64)
    expected = F.conv2d(plane.view(1, 1, height, width), taps.view(1, 1, kh, kw), padding=(kh // 2, kw // 2))
    torch.testing.assert_close(_ext()._depthwise_reference(plane, taps, False), expected.view(height, width))
    grad = torch.randn(1, 1, height, width, dtype=torch.float64)
    expected_transposed = F.conv_transpose2d(grad, taps.view(1, 1, kh, kw), padding=(kh // 2, kw // 2))
    torch.testing.assert_close(_ext()._depthwise_reference(grad.view(height, width), taps, True),
                               expected_transposed.view(height, width))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward_coefficients_match_autograd(training):
    x = torch.randn(40, dtype=torch.float64) * 2 + 1
    dy = torch.randn(40, dtype=torch.float64)
    weight, bias, eps = 1.3, -0.2, 1e-5
    if training:
        mean, var = x.mean().item(), x.var(unbiased=False).item()
    else:
        mean, var = 0.4, 1.7
    xr = x.clone().requires_grad_()
    m, v = (xr.mean(), xr.var(unbiased=False)) if training else (mean, var)
    y = (xr - m) / torch.sqrt(torch.as_tensor(v) + eps) * weight + bias
    y.backward(dy)
    a, b, c = _ext()._batch_norm_backward(weight, mean, var, eps, dy.sum().item(), (dy * (x - mean)).sum().item(),
                                          40.0, training)
    torch.testing.assert_close(a * dy + b * x + c, xr.grad)


# ----------------------------------------------------------------------------------------------------------------
# Bad input to the raw kernels: every case runs in one subprocess, so that a crash fails the tests instead of
# killing pytest.

BAD_INPUT_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import ghostfused._C  # registers the ghostfused_C kernels
    C = torch.ops.ghostfused_C

    def ghost(cin=4, oup=6, dtype=torch.float32):
        init = (oup + 1) // 2
        return [torch.randn(init, cin, 1, 1, dtype=dtype), torch.randn(init, 1, 3, 3, dtype=dtype)]

    def bns(*sizes, dtype=torch.float32):
        return ([torch.rand(c, dtype=dtype) + 0.5 for c in sizes], [torch.randn(c, dtype=dtype) for c in sizes],
                [torch.randn(c, dtype=dtype) for c in sizes], [torch.rand(c, dtype=dtype) + 0.5 for c in sizes],
                [1e-5] * len(sizes))

    def dfc(c=6, cin=4, k=5):
        return [torch.randn(c, cin, 1, 1), torch.randn(c, 1, 1, k), torch.randn(c, 1, k, 1)]

    x = torch.randn(2, 4, 6, 5)
    cases = {
        "x_3d": lambda: C.ghost_concat_forward(torch.randn(4, 6, 5), *ghost(), *bns(3, 3), 6, True, False, None),
        "x_int": lambda: C.ghost_concat_forward(torch.ones(2, 4, 6, 5, dtype=torch.int32), *ghost(), *bns(3, 3), 6,
                                                True, False, None),
        "primary_shape": lambda: C.ghost_concat_forward(x, torch.randn(3, 5, 1, 1), ghost()[1], *bns(3, 3), 6, True,
                                                        False, None),
        "primary_dtype": lambda: C.ghost_concat_forward(x, *ghost(dtype=torch.float64), *bns(3, 3), 6, True, False,
                                                        None),
        "cheap_not_multiple": lambda: C.ghost_concat_forward(x, ghost()[0], torch.randn(4, 1, 3, 3), *bns(3, 4), 6,
                                                             True, False, None),
        "cheap_even": lambda: C.ghost_concat_forward(x, ghost()[0], torch.randn(3, 1, 4, 4), *bns(3, 3), 6, True,
                                                     False, None),
        "oup_range": lambda: C.ghost_concat_forward(x, *ghost(), *bns(3, 3), 7, True, False, None),
        "bn_list_length": lambda: C.ghost_concat_forward(x, *ghost(), *bns(3), 6, True, False, None),
        "bn_shape": lambda: C.ghost_concat_forward(x, *ghost(), *bns(3, 4), 6, True, False, None),
        "bn_eps": lambda: C.ghost_concat_forward(x, *ghost(), *bns(3, 3)[:4], [1e-5, 0.0], 6, True, False, None),
        "training_one_value": lambda: C.ghost_concat_forward(torch.randn(1, 4, 1, 1), *ghost(), *bns(3, 3), 6,
                                                             True, True, None),
        "grad_out_shape": lambda: C.ghost_concat_backward(torch.randn(2, 5, 6, 5), torch.empty(0), x, *ghost(),
                                                          *bns(3, 3), 6, True, True, None),
        "attn_too_small": lambda: C.ghost_attn_forward(torch.randn(2, 4, 1, 5), *ghost(), *dfc(),
                                                       *bns(3, 3, 6, 6, 6), 6, True, "nearest", False, None),
        "kernel_even": lambda: C.ghost_attn_forward(x, *ghost(), *dfc(k=4), *bns(3, 3, 6, 6, 6), 6, True,
                                                    "nearest", False, None),
        "vertical_shape": lambda: C.ghost_attn_forward(x, *ghost(), *dfc()[:2], torch.randn(6, 1, 3, 1),
                                                       *bns(3, 3, 6, 6, 6), 6, True, "nearest", False, None),
        "upsample_mode": lambda: C.ghost_attn_forward(x, *ghost(), *dfc(), *bns(3, 3, 6, 6, 6), 6, True, "cubic",
                                                      False, None),
        "attn_bn_count": lambda: C.ghost_attn_forward(x, *ghost(), *dfc(), *bns(3, 3, 6, 6), 6, True, "nearest",
                                                      False, None),
        "features_shape": lambda: C.dfc_attention_forward(x, torch.randn(2, 6, 6, 4), *dfc(), *bns(6, 6, 6),
                                                          "nearest", False, None),
        "features_dtype": lambda: C.dfc_attention_forward(x, torch.randn(2, 6, 6, 5, dtype=torch.float64), *dfc(),
                                                          *bns(6, 6, 6), "nearest", False, None),
        "conv_channels": lambda: C.dfc_attention_forward(x, torch.randn(2, 6, 6, 5), *dfc(c=5), *bns(6, 6, 6),
                                                         "nearest", False, None),
        "dfc_grad_out": lambda: C.dfc_attention_backward(torch.randn(2, 6, 6, 4), torch.empty(0), x,
                                                         torch.randn(2, 6, 6, 5), *dfc(), *bns(6, 6, 6), "nearest",
                                                         True, None),
    }
    results = {}
    for name, call in cases.items():
        try:
            call()
            results[name] = ["no error", ""]
        except Exception as e:  # noqa: BLE001
            results[name] = [type(e).__name__ + ("(RuntimeError)" if isinstance(e, RuntimeError) else ""),
                             str(e).split("\\n")[0]]
    json.dump(results, sys.stdout)
''')

BAD_INPUT_CASES = {
    "x_3d": "x must be 4-D",
    "x_int": "x must be float16, bfloat16, float32 or float64",
    "primary_shape": "primary_weight must have shape",
    "primary_dtype": "primary_weight must have x's dtype",
    "cheap_not_multiple": "new a multiple of init=3",
    "cheap_even": "dw odd",
    "oup_range": "oup must be in [3, 6]",
    "bn_list_length": "bn_weight must hold 2 tensors",
    "bn_shape": "bn_weight[1] must have shape [3]",
    "bn_eps": "bn_eps[1] must be positive",
    "training_one_value": "expected more than 1 value per channel when training",
    "grad_out_shape": "grad_out must have shape",
    "attn_too_small": "H >= 2 and W >= 2",
    "kernel_even": "K odd",
    "vertical_shape": "vertical_weight must have shape",
    "upsample_mode": "upsample must be 'nearest' or 'bilinear'",
    "attn_bn_count": "bn_weight must hold 5 tensors",
    "features_shape": "features must have shape",
    "features_dtype": "features must have x's dtype",
    "conv_channels": "conv_weight must have shape",
    "dfc_grad_out": "grad_out must have shape",
}


@pytest.fixture(scope="module")
def bad_input_results():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", BAD_INPUT_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, f"the bad-input subprocess failed (rc {run.returncode}):\n{run.stderr[-3000:]}"
    return json.loads(run.stdout)


@pytest.mark.parametrize("case", sorted(BAD_INPUT_CASES))
def test_raw_kernel_rejects_bad_input(bad_input_results, case):
    kind, message = bad_input_results[case]
    assert kind.endswith("(RuntimeError)"), f"{case}: expected a RuntimeError, got {kind}: {message}"
    assert BAD_INPUT_CASES[case] in message, f"{case}: unexpected message {message!r}"
    assert "ghostfused_C::" in message, f"{case}: the message should name the op: {message!r}"


# The block cache of the CPU kernels' outputs and large temporaries (csrc/cpu/block_cache.h).

def test_block_cache_serves_freed_blocks_and_outputs_stay_correct():
    """A freed output's block serves the next call of the same shape, training and eval, and every output still
    matches the reference (the kernels write every element of a reused block)."""
    C = ghostfused.backends.extension()
    module = _module("ghost_attn", 24, 40, torch.float32).train()
    x = torch.randn(2, 24, 33, 31)  # outputs and temporaries over the cache's 128 KiB minimum
    features = torch.randn(2, 40, 33, 31)
    grad = torch.randn(2, 40, 33, 31)
    expected_out, expected_grads = _step("ghost_attn", fused_copy(module, "eager"), x, features, grad, True,
                                         fused=False)
    reused = C._cpu_block_cache_info()[2]
    for _ in range(3):
        out, grads = _step("ghost_attn", fused_copy(module, "eager"), x, features, grad, True, fused=True)
        assert_close(out, expected_out, torch.float32)
        for actual, expected in zip(grads, expected_grads, strict=True):
            assert_close(actual, expected, torch.float32, scale=10)
    module.eval()
    with torch.no_grad():
        for _ in range(2):
            assert_close(_call("ghost_attn", module, x, features, False), module(x), torch.float32)
    assert C._cpu_block_cache_info()[2] > reused


def test_block_cache_is_bounded_and_can_be_turned_off():
    """Idle blocks stay within the bound (GHOSTFUSED_CPU_CACHE_MB), clear() frees them, and 0 turns the cache off."""
    script = textwrap.dedent('''
        import torch, ghostfused
        from ghostfused import ops
        C = ghostfused.backends.extension()
        w, cheap, bn = torch.randn(32, 16, 1, 1), torch.randn(32, 1, 3, 3), torch.nn.BatchNorm2d(32).eval()
        for size in (40, 48, 56, 64, 40, 48):
            out = ops.ghost_concat(torch.randn(4, 16, size, size), w, bn, cheap, bn, 64, backend="cpu")
            del out
            idle, limit, reused = C._cpu_block_cache_info()
            assert idle <= limit, (idle, limit)
        C._cpu_block_cache_clear()
        print(limit, reused, C._cpu_block_cache_info()[0])
    ''')
    results = {}
    for megabytes in ("1", "0"):
        env = {**os.environ, "GHOSTFUSED_CPU_CACHE_MB": megabytes}
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results[megabytes] = [int(v) for v in run.stdout.split()]
    assert results["1"][0] == 1 << 20 and results["1"][2] == 0
    assert results["0"] == [0, 0, 0]
