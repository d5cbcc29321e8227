"""The eager reference against hand-computed cases, the official layout and the published parameter counts."""

import math

import pytest
import torch
import torch.nn as nn

from ghostfused import reference
from ghostfused.models import ghostnetv2

from helpers import ghost_module


def test_make_divisible():
    assert reference.make_divisible(16) == 16
    assert reference.make_divisible(16 * 1.3) == 20  # 20.8 -> 20
    assert reference.make_divisible(72 * 0.25) == 20  # 18 -> 20 (int(18 + 2) // 4 * 4)
    assert reference.make_divisible(2) == 4  # never below the divisor
    assert reference.make_divisible(10.2, 8) == 16  # 8 < 0.9 * 10.2, so one divisor more


def test_avg_pool_drops_the_last_odd_row_and_column():
    # A 5x3 map: the 2x2 pool keeps rows 0..3 and column 0..1 (floor), giving 2x1.
    x = torch.arange(15, dtype=torch.float64).view(1, 1, 5, 3)
    pooled = torch.nn.functional.avg_pool2d(x, 2, 2)
    expected = torch.tensor([[(0 + 1 + 3 + 4) / 4], [(6 + 7 + 9 + 10) / 4]], dtype=torch.float64)
    assert torch.equal(pooled[0, 0], expected)


@pytest.mark.parametrize("size", [(7, 7), (5, 9), (2, 3), (14, 11)])
def test_nearest_gate_upsampling_maps_row_i_to_floor_i_h_over_H(size):
    height, width = size
    h, w = height // 2, width // 2
    gate = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    up = reference._upsample(gate, (height, width), "nearest")
    for i in range(height):
        for j in range(width):
            assert up[0, 0, i, j] == gate[0, 0, i * h // height, j * w // width]


def test_attn_module_at_7x7_uses_a_3x3_gate():
    module = ghost_module(4, 6, dtype=torch.float64).eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    res = module.short_conv(torch.nn.functional.avg_pool2d(x, 2, 2))
    assert res.shape == (2, 6, 3, 3)
    assert module(x).shape == (2, 6, 7, 7)


def test_attn_module_by_hand():
    """Every step of SPEC section 1 written out for a 1-channel module on a non-square 3x5 input."""
    module = ghost_module(1, 1, dtype=torch.float64, dfc_kernel_size=3).eval()
    x = torch.randn(1, 1, 3, 5, dtype=torch.float64)
    bn = lambda t, m: (t - m.running_mean.view(-1, 1, 1)) / torch.sqrt(m.running_var.view(-1, 1, 1) + m.eps) \
        * m.weight.view(-1, 1, 1) + m.bias.view(-1, 1, 1)
    x1 = torch.relu(bn(x[0] * module.primary_conv[0].weight[0, 0], module.primary_conv[1]))
    padded = torch.nn.functional.pad(x1, (1, 1, 1, 1))
    kernel = module.cheap_operation[0].weight[0, 0]
    x2 = torch.zeros_like(x1)
    for i in range(3):
        for j in range(5):
            x2[0, i, j] = (padded[0, i:i + 3, j:j + 3] * kernel).sum()
    x2 = torch.relu(bn(x2, module.cheap_operation[1]))
    ghost = torch.cat([x1, x2])[:1]  # oup=1 is odd: the cheap channel is dropped
    pooled = torch.tensor([[[(x[0, 0, 0, 0] + x[0, 0, 0, 1] + x[0, 0, 1, 0] + x[0, 0, 1, 1]) / 4,
                             (x[0, 0, 0, 2] + x[0, 0, 0, 3] + x[0, 0, 1, 2] + x[0, 0, 1, 3]) / 4]]],
                          dtype=torch.float64)
    s = module.short_conv
    z = bn(pooled * s[0].weight[0, 0], s[1])
    zh = torch.nn.functional.pad(z, (1, 1))
    z = bn(torch.stack([(zh[0, 0, j:j + 3] * s[2].weight[0, 0, 0]).sum() for j in range(2)]).view(1, 1, 2), s[3])
    z = bn(z * s[4].weight[0, 0, 1, 0], s[5])  # one row: only the centre tap of the vertical kernel sees data
    gate = torch.sigmoid(z)
    expected = ghost * gate[:, [0, 0, 0]][:, :, [0, 0, 0, 1, 1]]  # rows i*1//3 = 0, columns j*2//5
    torch.testing.assert_close(module(x)[0], expected)


@pytest.mark.parametrize("oup", [5, 6])
def test_channel_slice_for_odd_oup(oup):
    module = ghost_module(3, oup, mode="original")
    init = math.ceil(oup / 2)
    assert module.primary_conv[0].out_channels == init
    assert module.cheap_operation[0].out_channels == init
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = module.eval()(x)
    x1 = module.primary_conv(x)
    x2 = module.cheap_operation(x1)
    assert out.shape[1] == oup
    torch.testing.assert_close(out[:, :init], x1)
    torch.testing.assert_close(out[:, init:], x2[:, :oup - init])


@pytest.mark.parametrize("width, millions", [(1.0, 6.16), (1.3, 8.96), (1.6, 12.39)])
def test_parameter_counts(width, millions):
    count = sum(p.numel() for p in ghostnetv2(width, backend=None).parameters())
    assert abs(count / 1e6 - millions) / millions < 0.005


def test_state_dict_layout():
    model = ghostnetv2(1.0, backend=None)
    keys = list(model.state_dict())
    assert keys[:2] == ["conv_stem.weight", "bn1.weight"]
    for key in ["blocks.0.0.ghost1.primary_conv.0.weight", "blocks.0.0.ghost1.cheap_operation.1.running_var",
                "blocks.2.0.ghost1.short_conv.2.weight", "blocks.2.0.ghost1.short_conv.5.num_batches_tracked",
                "blocks.1.0.conv_dw.weight", "blocks.1.0.bn_dw.weight", "blocks.1.0.shortcut.3.bias",
                "blocks.3.0.se.conv_reduce.weight", "blocks.3.0.se.conv_expand.bias", "blocks.9.0.conv.weight",
                "blocks.9.0.bn1.running_mean", "conv_head.weight", "conv_head.bias", "classifier.weight"]:
        assert key in keys, key
    assert not any("short_conv" in k for k in keys if k.startswith(("blocks.0.", "blocks.1.")))
    attn = [m for m in model.modules() if isinstance(m, reference.GhostModuleV2) and m.mode == "attn"]
    assert len(attn) == 14
    assert model.blocks[2][0].ghost1.short_conv[2].weight.shape == (72, 1, 1, 5)
    assert model.blocks[2][0].ghost1.short_conv[4].weight.shape == (72, 1, 5, 1)


def test_network_runs_on_non_square_images_in_train_and_eval():
    model = ghostnetv2(1.0, num_classes=10, backend=None)
    x = torch.randn(2, 3, 64, 48)
    assert model(x).shape == (2, 10)
    assert model.eval()(x).shape == (2, 10)


def test_squeeze_excite_uses_hard_sigmoid():
    se = reference.SqueezeExcite(8, 0.25)
    assert se.conv_reduce.out_channels == 4
    x = torch.randn(2, 8, 3, 3)
    scale = se.conv_expand(torch.relu(se.conv_reduce(x.mean((2, 3), keepdim=True))))
    torch.testing.assert_close(se(x), x * torch.clamp(scale + 3, 0, 6) / 6)


def test_bilinear_upsample_option():
    module = ghost_module(4, 6, upsample="bilinear").eval()
    x = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    out = module(x)
    gate = torch.sigmoid(module.short_conv(torch.nn.functional.avg_pool2d(x, 2)))
    up = torch.nn.functional.interpolate(gate, size=(6, 5), mode="bilinear", align_corners=False)
    ghost = torch.cat([module.primary_conv(x), module.cheap_operation(module.primary_conv(x))], 1)[:, :6]
    torch.testing.assert_close(out, ghost * up)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="mode"):
        reference.GhostModuleV2(4, 4, mode="dfc")
    with pytest.raises(ValueError, match="upsample"):
        reference.GhostModuleV2(4, 4, mode="attn", upsample="bicubic")
    with pytest.raises(ValueError, match="dfc_kernel_size"):
        reference.GhostModuleV2(4, 4, mode="attn", dfc_kernel_size=4)
    assert isinstance(reference.GhostModuleV2(4, 4).cheap_operation[2], nn.ReLU)
