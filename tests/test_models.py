"""Model constructors, the official checkpoint loader, and state-dict parity with timm (where timm imports)."""

import pytest
import torch

import ghostfused
from ghostfused.models import ghostnetv2, ghostnetv2_100, ghostnetv2_130, ghostnetv2_160, load_official


def test_constructors():
    for make, width in [(ghostnetv2_100, 1.0), (ghostnetv2_130, 1.3), (ghostnetv2_160, 1.6)]:
        model = make(num_classes=7)
        assert model.classifier.out_features == 7
        assert model.conv_stem.out_channels == ghostfused.reference.make_divisible(16 * width)
    fused = ghostnetv2(backend="eager")
    assert sum(isinstance(m, ghostfused.nn.GhostModuleV2) for m in fused.modules()) == 32
    plain = ghostnetv2(backend=None)
    assert not any(isinstance(m, ghostfused.nn.GhostModuleV2) for m in plain.modules())


def test_load_official_checkpoint_format(tmp_path):
    source = ghostnetv2_100(backend=None)
    state = dict(source.state_dict())
    state["total_ops"] = torch.zeros(1)
    state["total_params"] = torch.zeros(1)
    state["blocks.0.0.ghost1.total_ops"] = torch.zeros(1)
    path = tmp_path / "ck_ghostnetv2_10.pth.tar"
    torch.save({"state_dict": state, "epoch": 300}, path)
    model = load_official(ghostnetv2_100(), path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    load_official(ghostnetv2_100(), state)  # a plain mapping works too
    with pytest.raises(TypeError, match="path_or_state_dict"):
        load_official(ghostnetv2_100(), 3)


@pytest.mark.parametrize("name, width", [("ghostnetv2_100", 1.0), ("ghostnetv2_130", 1.3),
                                         ("ghostnetv2_160", 1.6)])
def test_timm_state_dict_parity(name, width):
    timm = pytest.importorskip("timm", reason="timm does not import here (see ENV.md); checked on the GPU machine")
    theirs = timm.create_model(name, pretrained=False)
    ours = ghostnetv2(width)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-4, atol=1e-4)
