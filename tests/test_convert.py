"""ghostfused.convert on our model, official-style and timm-style modules: same tensors, same results."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghostfused
from ghostfused import reference
from ghostfused.models import ghostnetv2

from helpers import assert_modules_match, assert_step_matches, cpu_backends, randomize_batch_norms

BACKENDS = cpu_backends()


class OfficialStyleGhostModule(nn.Module):
    """Written like the official GhostNetV2 code: ``oup``, ``nn.Sequential()`` as the identity activation."""

    def __init__(self, inp, oup, relu=True, mode="attn"):
        super().__init__()
        self.mode, self.oup = mode, oup
        self.gate_fn = nn.Sigmoid()
        init = math.ceil(oup / 2)
        act = lambda: nn.ReLU(inplace=True) if relu else nn.Sequential()
        self.primary_conv = nn.Sequential(nn.Conv2d(inp, init, 1, 1, 0, bias=False), nn.BatchNorm2d(init), act())
        self.cheap_operation = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False),
                                             nn.BatchNorm2d(init), act())
        if mode == "attn":
            self.short_conv = nn.Sequential(
                nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, (1, 5), 1, (0, 2), groups=oup, bias=False), nn.BatchNorm2d(oup),
                nn.Conv2d(oup, oup, (5, 1), 1, (2, 0), groups=oup, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)[:, :self.oup]
        if self.mode == "original":
            return out
        res = self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2))
        return out * F.interpolate(self.gate_fn(res), size=out.shape[-2:], mode="nearest")


class TimmStyleGhostModule(OfficialStyleGhostModule):
    """timm's naming: ``out_chs`` instead of ``oup``, no ``mode`` attribute, nn.Identity when there is no act."""

    def __init__(self, inp, oup, relu=True, attn=True):
        super().__init__(inp, oup, relu, "attn" if attn else "original")
        self.out_chs = oup
        del self.oup
        if not relu:
            self.primary_conv[2] = nn.Identity()
            self.cheap_operation[2] = nn.Identity()

    def forward(self, x):
        self.oup = self.out_chs
        self.mode = "attn" if hasattr(self, "short_conv") else "original"
        return super().forward(x)


class Net(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.body = nn.Sequential(make(6, 7), nn.ReLU(), make(7, 6))

    def forward(self, x):
        return self.body(self.stem(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["official", "timm", "ours"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_keeps_outputs_gradients_and_statistics(backend, style, training):
    make = {"official": lambda i, o: OfficialStyleGhostModule(i, o, mode="attn"),
            "timm": lambda i, o: TimmStyleGhostModule(i, o, relu=o % 2 == 0),
            "ours": lambda i, o: reference.GhostModuleV2(i, o, mode="attn")}[style]
    model = randomize_batch_norms(Net(make)).double().train(training)
    fused = copy.deepcopy(model)
    keys = list(fused.state_dict())
    fused = ghostfused.convert(fused, backend=backend)
    assert list(fused.state_dict()) == keys
    assert all(isinstance(m, ghostfused.nn.GhostModuleV2) for m in fused.body if not isinstance(m, nn.ReLU))
    for _ in range(2):
        x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
        grad = torch.randn(2, 6, 6, 5, dtype=torch.float64)
        assert_step_matches(model, fused, x, grad)
    assert_modules_match(model, fused, torch.float64)


def test_convert_shares_parameter_and_buffer_tensors():
    model = ghostnetv2(1.0, backend=None)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fused = ghostfused.convert(model, backend="eager")
    assert fused is model
    assert {k: v.data_ptr() for k, v in fused.state_dict().items()} == before
    fused_modules = [m for m in fused.modules() if isinstance(m, ghostfused.nn.GhostModuleV2)]
    assert len(fused_modules) == 32


def test_convert_whole_model_matches_eager():
    model = randomize_batch_norms(ghostnetv2(1.0, num_classes=10, backend=None)).eval()
    fused = ghostfused.convert(copy.deepcopy(model), backend="auto")
    x = torch.randn(2, 3, 64, 40)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_converted_model_stem_and_head(training, layout):
    """Our GhostNetV2 becomes ghostfused.nn.GhostNetV2 in place (stem folded in eval, head as a linear layer) and
    its final ConvBnAct a ghostfused.nn.ConvBnAct: outputs, input and parameter gradients, and state dict as the
    reference, in both modes and layouts."""
    model = randomize_batch_norms(ghostnetv2(0.5, num_classes=7, dropout=0.0, backend=None)).double().train(training)
    keys = list(model.state_dict())
    fused = ghostfused.convert(copy.deepcopy(model), backend="eager")
    assert type(fused) is ghostfused.nn.GhostNetV2 and type(fused.blocks[-1][0]) is ghostfused.nn.ConvBnAct
    assert list(fused.state_dict()) == keys
    x = torch.randn(3, 3, 37, 45, dtype=torch.float64).contiguous(memory_format=layout)
    assert_step_matches(model, fused, x, torch.randn(3, 7, dtype=torch.float64))
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_folds_in_eval_only(bias):
    """ghostfused.nn.conv_bn: in eval one convolution with the BatchNorm folded (no batch_norm op runs), equal to the
    layers, gradients included; in training the layers themselves (batch statistics, running updates)."""
    conv = nn.Conv2d(4, 6, 3, 2, 1, bias=bias).double()
    bn = randomize_batch_norms(nn.BatchNorm2d(6)).double().eval()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    with torch.profiler.profile() as profile:
        out = ghostfused.nn.conv_bn(conv, bn, x)
    assert not any("batch_norm" in event.name for event in profile.events())
    expected = bn(conv(x))
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), [x, conv.weight, bn.weight, bn.bias])
    for actual, wanted in zip(grads, torch.autograd.grad(expected.sum(), [x, conv.weight, bn.weight, bn.bias])):
        torch.testing.assert_close(actual, wanted)
    bn.train()
    running = bn.running_mean.clone()
    torch.testing.assert_close(ghostfused.nn.conv_bn(conv, bn, x), F.batch_norm(conv(x), None, None, bn.weight,
                                                                                  bn.bias, training=True))
    assert not torch.equal(bn.running_mean, running)


def test_unfusable_module_stays_with_one_warning():
    model = nn.Sequential(reference.GhostModuleV2(4, 6, kernel_size=3), reference.GhostModuleV2(6, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ghostfused.convert(model, backend="eager")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "0" in messages[0] and "1x1" in messages[0], messages
    assert type(model[0]) is reference.GhostModuleV2
    assert isinstance(model[1], ghostfused.nn.GhostModuleV2)


def test_frozen_batch_norm_uses_the_eager_path():
    """A BatchNorm in eval mode inside a training module (a common fine-tuning setup) behaves as eager."""
    model = randomize_batch_norms(reference.GhostModuleV2(3, 4, mode="attn")).double().train()
    model.short_conv[3].eval()
    fused = ghostfused.convert(copy.deepcopy(model), backend="eager")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x))
    assert_modules_match(model, fused, torch.float64)


def test_convert_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ghostfused.convert(nn.Sequential(), backend="fast")
    with pytest.raises(TypeError, match="nn.Module"):
        ghostfused.convert("model")

