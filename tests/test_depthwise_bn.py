"""``ghostfused.ops.depthwise_bn`` (a depthwise convolution + BatchNorm) on every backend against eager PyTorch, and
its use by ``convert`` in GhostNetV2's bottlenecks and shortcuts.

Forward, all gradients and running statistics in train and eval mode, odd and non-square sizes, strides 1 to 3,
kernels 1 to 7, N = 0, 1, 3, contiguous and channels_last, gradcheck in float64, opcheck, determinism across
thread counts and bad inputs. Kernel outputs are NaN-poisoned (conftest), so an unwritten element fails.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghostfused
from ghostfused import ops, reference
from ghostfused.nn import DepthwiseBNSequential, GhostBottleneckV2
from ghostfused.ops.batch_norm import BatchNorm
from ghostfused.ops.depthwise_bn import depthwise_bn_op
from ghostfused.testing import randomize_batch_norms

from helpers import assert_close, assert_modules_match, assert_step_matches, cpu_backends, run_step

BACKENDS = cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b == "cpu"]

# (N, C, H, W, k, stride): GhostNetV2's k = 3 and 5 at stride 2 and 1, odd and non-square planes smaller and larger
# than the kernel, N = 0, 1, 3, and the edge cases k = 1 and a stride above the kernel's reach.
CASES = [(2, 3, 7, 9, 3, 2), (1, 5, 8, 8, 5, 2), (3, 4, 6, 5, 3, 1), (2, 2, 11, 4, 5, 1), (2, 3, 5, 7, 7, 3),
         (3, 2, 3, 2, 5, 2), (2, 3, 5, 5, 1, 2), (1, 2, 9, 13, 3, 4), (0, 3, 6, 6, 3, 2)]


def _layers(c, k, stride, dtype):
    conv = nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False).to(dtype)
    bn = randomize_batch_norms(nn.Sequential(nn.BatchNorm2d(c))).to(dtype)[0]
    return conv, bn


def _case_id(case):
    return "n{}c{}_{}x{}_k{}s{}".format(*case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_eager(backend, case, training, dtype):
    n, c, h, w, k, stride = case
    if training and n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) == 1:
        pytest.skip("a training BatchNorm needs more than one value per channel")
    conv, bn = _layers(c, k, stride, dtype)
    eager = nn.Sequential(conv, bn).train(training)
    fused = copy.deepcopy(eager)
    for step, channels_last in enumerate((False, True)):  # two steps: running statistics compound
        x = torch.randn(n, c, h, w, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        grad = torch.randn(n, c, (h - 1) // stride + 1, (w - 1) // stride + 1, dtype=dtype)
        expected, expected_dx = run_step(eager, x, grad)
        actual, actual_dx = run_step(
            lambda t: ops.depthwise_bn(t, fused[0].weight, fused[1], stride, training=training, backend=backend),
            x, grad)
        assert_close(actual, expected, dtype, f"output, step {step}")
        assert_close(actual_dx, expected_dx, dtype, f"input gradient, step {step}")
        assert actual.is_contiguous(memory_format=reference.memory_format_of(x))
    assert_modules_match(eager, fused, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(backend, training):
    n, c, h, w, k, stride = 2, 3, 7, 6, 3, 2
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    bn_weight = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    bn_bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def f(x, weight, bn_weight, bn_bias):
        bn = BatchNorm(bn_weight, bn_bias, mean.clone(), var.clone(), torch.tensor(0), 0.1, 1e-5)
        return ops.depthwise_bn(x, weight, bn, stride, training=training, backend=backend)

    torch.autograd.gradcheck(f, (x, weight, bn_weight, bn_bias), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(backend, training):
    c = 3
    args = [torch.randn(2, c, 5, 7, dtype=torch.float64, requires_grad=True),
            torch.randn(c, 1, 3, 3, dtype=torch.float64, requires_grad=True),
            [torch.rand(c, dtype=torch.float64) + 0.5], [torch.randn(c, dtype=torch.float64)],
            [torch.randn(c, dtype=torch.float64)], [torch.rand(c, dtype=torch.float64) + 0.5], [1e-5], 2, training,
            None, backend]
    torch.library.opcheck(depthwise_bn_op, args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_kernel_is_deterministic_across_thread_counts(backend, training):
    conv, bn = _layers(24, 5, 2, torch.float32)
    x = torch.randn(3, 24, 29, 23)
    grad = torch.randn(3, 24, 15, 12)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            state = copy.deepcopy(bn).train(training)
            x_ = x.clone().requires_grad_()
            w_ = conv.weight.detach().clone().requires_grad_()
            out = ops.depthwise_bn(x_, w_, state, 2, training=training, backend=backend)
            out.backward(grad)
            results.append([out, x_.grad, w_.grad, state.weight.grad, state.bias.grad, state.running_mean,
                            state.running_var])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_raw_kernel_handles_channels_last_and_propagates_nan(backend):
    """The C++ kernel itself (the public op sends channels_last to oneDNN): right values and layout, and a NaN in
    x reaches the outputs it feeds as in eager."""
    conv, bn = _layers(4, 3, 2, torch.float64)
    bn.eval()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    x[1, 2, 4, 4] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.ops.ghostfused_C.depthwise_bn_forward(x, conv.weight, [bn.weight], [bn.bias], [bn.running_mean],
                                                      [bn.running_var], [bn.eps], 2, False, None)[0]
    expected = bn(conv(x))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert out.isnan().sum() == expected.isnan().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, error, match", [
    (dict(weight=torch.randn(3, 1, 2, 2, dtype=torch.float64)), ValueError, "weight must have shape .* k odd"),
    (dict(weight=torch.randn(4, 1, 3, 3, dtype=torch.float64)), ValueError, "weight must have shape"),
    (dict(weight=torch.randn(3, 1, 3, 3)), TypeError, "weight must have x's dtype"),
    (dict(stride=0), ValueError, "stride must be positive"),
    (dict(stride=True), TypeError, "stride must be an int"),
    (dict(x=torch.randn(2, 3, 5)), ValueError, "x must be 4-D"),
    (dict(x=torch.ones(2, 3, 5, 5, dtype=torch.int64)), TypeError, "x must be float"),
    (dict(bn=nn.BatchNorm2d(4).double()), ValueError, r"bn.weight must have shape \(3,\)"),
    (dict(bn="bn"), TypeError, "bn must be an nn.BatchNorm2d"),
    (dict(x=torch.randn(1, 3, 1, 1, dtype=torch.float64), training=True), ValueError, "more than 1 value"),
])
def test_bad_input(backend, bad, error, match):
    args = dict(x=torch.randn(2, 3, 5, 5, dtype=torch.float64), weight=torch.randn(3, 1, 3, 3, dtype=torch.float64),
                bn=nn.BatchNorm2d(3).double(), stride=2, training=False)
    args.update(bad)
    with pytest.raises(error, match=match):
        ops.depthwise_bn(args["x"], args["weight"], args["bn"], args["stride"], training=args["training"],
                         backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.randn(3, 1, 4, 4, dtype=torch.float64)), "k odd"),
    (dict(stride=0), "stride must be positive"),
    (dict(bn_weight=[torch.randn(2, dtype=torch.float64)]), r"bn_weight\[0\] must have shape \[3\]"),
    (dict(bn_eps=[0.0]), "bn_eps"),
    (dict(grad_out=torch.randn(2, 3, 5, 5, dtype=torch.float64)), "grad_out must have shape"),
    (dict(saved=torch.zeros(3, dtype=torch.float64)), "saved must be empty"),
])
def test_raw_kernel_checks_its_arguments(backend, bad, match):
    """The C++ kernels check what they are given (TORCH_CHECK: RuntimeError), never read out of bounds."""
    args = dict(x=torch.randn(2, 3, 5, 5, dtype=torch.float64), weight=torch.randn(3, 1, 3, 3, dtype=torch.float64),
                bn_weight=[torch.ones(3, dtype=torch.float64)], bn_bias=[torch.zeros(3, dtype=torch.float64)],
                bn_mean=[torch.zeros(3, dtype=torch.float64)], bn_var=[torch.ones(3, dtype=torch.float64)],
                bn_eps=[1e-5], stride=2, grad_out=torch.randn(2, 3, 3, 3, dtype=torch.float64),
                saved=torch.zeros(0, dtype=torch.float64))
    args.update(bad)
    schema = [args[name] for name in ("x", "weight", "bn_weight", "bn_bias", "bn_mean", "bn_var", "bn_eps", "stride")]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ghostfused_C.depthwise_bn_backward(args["grad_out"], args["saved"], *schema, False, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_converted_bottleneck_matches_reference(backend, training):
    """convert turns our bottleneck into nn.GhostBottleneckV2 (conv_dw + bn_dw fused) and its shortcut into a
    DepthwiseBNSequential; same state dict, same outputs, gradients and running statistics."""
    torch.manual_seed(1)
    eager = randomize_batch_norms(reference.GhostBottleneckV2(8, 20, 12, dw_kernel_size=5, stride=2, se_ratio=0.25,
                                                              layer_id=3)).double().train(training)
    model_eager, model_fused = nn.Sequential(eager), ghostfused.convert(nn.Sequential(copy.deepcopy(eager)), backend)
    assert isinstance(model_fused[0], GhostBottleneckV2)
    assert isinstance(model_fused[0].shortcut, DepthwiseBNSequential)
    assert model_fused.state_dict().keys() == model_eager.state_dict().keys()
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    grad = torch.randn(2, 12, 6, 5, dtype=torch.float64)
    assert_step_matches(model_eager, model_fused, x, grad)
    assert_modules_match(model_eager, model_fused, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_converted_bottleneck_without_autograd(backend, stride):
    """Without a graph to record, the fused bottleneck adds the shortcut into ghost2's output in place: the same
    output as the reference (identity and convolution shortcuts), and the input is left alone."""
    torch.manual_seed(2)
    out_chs = 8 if stride == 1 else 12
    eager = randomize_batch_norms(reference.GhostBottleneckV2(8, 20, out_chs, dw_kernel_size=3, stride=stride,
                                                              se_ratio=0.25, layer_id=3)).eval()
    fused = ghostfused.convert(nn.Sequential(copy.deepcopy(eager)), backend)
    x = torch.randn(2, 8, 11, 9)
    before = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out, expected = fused(x), eager(x)
    assert out.dtype == expected.dtype


def test_convert_fuses_any_sequential_pair_and_the_cpu_kernel_runs():
    """Any plain Sequential's (depthwise conv, BatchNorm) pairs are fused, other layers kept; on the cpu backend the
    op's kernel computes them (NCHW), and the layers themselves in channels_last. The other (conv, BatchNorm) pair is
    one folded convolution in eval (no BatchNorm runs at all in NCHW)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not built")
    model = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4))
    eager = randomize_batch_norms(model).eval()
    fused = ghostfused.convert(nn.Sequential(copy.deepcopy(eager)), backend="cpu")[0]
    assert isinstance(fused, DepthwiseBNSequential) and fused.pairs == (0,)
    x = torch.randn(2, 4, 17, 19)  # 9x10 outputs: in eval, smaller planes run the layers (ghostfused.nn)
    for layout in (torch.contiguous_format, torch.channels_last):
        with torch.profiler.profile() as profile:
            out = fused(x.contiguous(memory_format=layout))
        names = {event.name for event in profile.events()}
        assert ("ghostfused_C::depthwise_bn_forward" in names) == (layout == torch.contiguous_format)
        assert ("aten::batch_norm" in names) == (layout == torch.channels_last)
        torch.testing.assert_close(out, eager(x), rtol=2e-4, atol=2e-4)


def test_eager_reference_matches_pytorch_layers():
    conv, bn = _layers(5, 5, 2, torch.float64)
    x = torch.randn(3, 5, 10, 7, dtype=torch.float64)
    out, mean, var = reference.depthwise_bn(x, conv.weight, [bn.weight], [bn.bias], [bn.running_mean],
                                            [bn.running_var], [bn.eps], 2, True)
    z = F.conv2d(x, conv.weight, stride=2, padding=2, groups=5)
    torch.testing.assert_close(out, F.batch_norm(z, None, None, bn.weight, bn.bias, training=True))
    torch.testing.assert_close(mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(var, z.var((0, 2, 3), correction=0))
