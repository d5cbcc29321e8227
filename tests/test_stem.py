"""The ``cpu`` backend's stem kernel (``ghostfused.ops.stem``, ``csrc/cpu/stem.cpp``): ``act(bn(conv(x)))`` in eval
mode against the eager layers, when the fused GhostNetV2 uses it, and bad inputs.

Odd and non-square sizes, kernels 1 to 5, strides 1 to 3, with and without a convolution bias and ReLU, N = 0, 1, 3,
float32 and float64, bitwise the same at 1 and 2 threads. Kernel outputs are NaN-poisoned (conftest), so an unwritten
element fails.
"""

import copy

import pytest
import torch
import torch.nn as nn

import ghostfused
from ghostfused import backends
from ghostfused.models import ghostnetv2
from ghostfused.ops.stem import MAX_TAPS, stem_kernel_output, stem_reason
from ghostfused.testing import randomize_batch_norms

from helpers import assert_close

pytestmark = pytest.mark.skipif(backends.extension() is None, reason="the C++ extension is not built")

# (N, Cin, Cout, H, W, k, stride): GhostNetV2's stem shape (3 -> 16, 3x3, stride 2) at odd and non-square sizes,
# channel counts that leave a partial block of output channels, output rows that leave a partial band, and the edge
# cases k = 1, k = 5, stride 3 and a plane smaller than the kernel.
CASES = [(2, 3, 16, 17, 23, 3, 2), (1, 3, 7, 9, 8, 3, 2), (3, 2, 5, 11, 6, 5, 1), (2, 3, 6, 13, 40, 3, 3),
         (1, 3, 3, 2, 3, 5, 2), (2, 3, 9, 7, 5, 1, 1), (0, 3, 16, 8, 8, 3, 2), (1, 3, 4, 37, 21, 3, 1)]


def _case_id(case):
    return "n{}_{}to{}_{}x{}_k{}s{}".format(*case)


def _layers(cin, cout, k, stride, bias, relu, dtype):
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias).to(dtype)
    bn = randomize_batch_norms(nn.Sequential(nn.BatchNorm2d(cout))).to(dtype)[0].eval()
    act = nn.ReLU(inplace=True) if relu else nn.Identity()
    return conv, bn, act


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_kernel_matches_the_layers(case, bias, relu, dtype):
    n, cin, cout, h, w, k, stride = case
    conv, bn, act = _layers(cin, cout, k, stride, bias, relu, dtype)
    x = torch.randn(n, cin, h, w, dtype=dtype)
    with torch.no_grad():
        expected = act(bn(conv(x)))
        actual = stem_kernel_output(conv, bn, act, x, "cpu")
    assert actual is not None
    assert actual.shape == expected.shape and actual.dtype == dtype and actual.is_contiguous()
    assert_close(actual, expected, dtype, "stem")


def test_bitwise_the_same_at_one_and_two_threads():
    conv, bn, act = _layers(3, 16, 3, 2, False, True, torch.float32)
    x = torch.randn(3, 3, 45, 39)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                outputs.append(stem_kernel_output(conv, bn, act, x, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])


def test_the_layers_run_where_the_kernel_does_not():
    conv, bn, act = _layers(3, 16, 3, 2, False, True, torch.float32)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert stem_kernel_output(conv, bn, act, x, "cpu") is not None
        assert stem_kernel_output(conv, bn, act, x, "eager") is None
        assert stem_kernel_output(conv, bn, act, x.contiguous(memory_format=torch.channels_last), "cpu") is None
        assert stem_kernel_output(conv, bn, act, x.half(), "cpu") is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert stem_kernel_output(conv, bn, act, x, "cpu") is None
        bn.train()
        assert stem_kernel_output(conv, bn, act, x, "cpu") is None
        bn.eval()
    assert stem_kernel_output(conv, bn, act, x, "cpu") is None  # grad mode and parameters that need gradients


def test_stem_reason():
    conv, bn, act = _layers(3, 16, 3, 2, False, True, torch.float32)
    assert stem_reason(conv, bn, act) is None
    assert "dense" in stem_reason(nn.Conv2d(4, 4, 3, 1, 1, groups=2), nn.BatchNorm2d(4), act)
    assert "padding" in stem_reason(nn.Conv2d(3, 16, 3, 2, 0), bn, act)
    assert "inputs per output" in stem_reason(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), act)
    assert MAX_TAPS >= 27
    assert "BatchNorm" in stem_reason(conv, nn.BatchNorm2d(16, affine=False), act)
    assert "activation" in stem_reason(conv, bn, nn.Hardswish())


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_model_runs_its_stem_in_the_kernel(batch, monkeypatch):
    eager = randomize_batch_norms(ghostnetv2(1.0, backend=None)).eval()
    fused = ghostfused.convert(copy.deepcopy(eager), backend="cpu")
    assert fused.backend == "cpu"
    calls = []
    ext = ghostfused.backends.extension()
    kernel = ext.stem_forward

    class Spy:
        def __call__(self, *args):
            calls.append(args[0].shape)
            return kernel(*args)

    monkeypatch.setattr(ext, "stem_forward", Spy())
    x = torch.randn(batch, 3, 64, 48)
    with torch.no_grad():
        expected, actual = eager(x), fused(x)
    assert calls == [x.shape]
    assert_close(actual, expected, torch.float32, "model")


def _arguments(**changes):
    conv, bn, _ = _layers(3, 16, 3, 2, True, True, torch.float32)
    args = dict(x=torch.randn(1, 3, 8, 8), weight=conv.weight.detach(), bias=conv.bias.detach(),
                bn_weight=[bn.weight.detach()], bn_bias=[bn.bias.detach()], bn_mean=[bn.running_mean],
                bn_var=[bn.running_var], bn_eps=[bn.eps], stride=2, relu=True)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, message", [
    (dict(x=torch.randn(3, 8, 8)), "x must be 4-D"),
    (dict(x=torch.randn(1, 3, 8, 8, dtype=torch.float64)), "weight must have x's dtype"),
    (dict(weight=torch.randn(16, 3, 2, 2)), "k odd"),
    (dict(weight=torch.randn(16, 4, 3, 3)), "weight must have shape"),
    (dict(bias=torch.randn(15)), "bias must have shape"),
    (dict(stride=0), "stride must be positive"),
    (dict(bn_weight=[]), "bn_weight must hold 1"),
    (dict(bn_mean=[torch.zeros(15)]), "bn_mean\\[0\\] must have shape"),
    (dict(bn_eps=[0.0]), "bn_eps\\[0\\] must be positive"),
    (dict(x=torch.randn(1, 3, 0, 8)), "H >= 1"),
])
def test_bad_inputs_raise_clear_errors(changes, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ghostfused_C.stem_forward(**_arguments(**changes))
