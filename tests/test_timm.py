"""timm: convert fuses timm's GhostNetV1 / GhostNetV2 models, patch_timm makes timm.create_model return them fused,
unpatch_timm undoes it.

The patching mechanics run everywhere against a fake ``timm`` package (module objects in ``sys.modules`` with
timm's registry layout). The tests with the real timm run where it imports (the GPU machine; on the CPU machines its
torchvision dependency fails to load, see ENV.md) and are skipped with the reason elsewhere.
"""

import copy
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn

import ghostfused
from ghostfused import reference
from ghostfused.models import ghostnetv2

from ecosystem_helpers import cuda_backends, fused_modules, requires_cuda
from helpers import randomize_batch_norms

TIMM_GHOSTNETS = ["ghostnet_100", "ghostnetv2_100", "ghostnetv2_130", "ghostnetv2_160"]


# ---------------------------------------------------------------------------------------------------------------
# patch_timm / unpatch_timm against a fake timm


def _fake_timm(monkeypatch, registry_module: str = "timm.models._registry") -> dict:
    """Install a fake timm package whose create_model looks names up in ``<registry_module>._model_entrypoints``;
    returns that dict, holding a GhostNetV2, an all-'original' GhostNetV1 stand-in and a non-Ghost model."""
    timm, timm_models, registry = (types.ModuleType(name) for name in ("timm", "timm.models", registry_module))
    registry._model_entrypoints = {
        "ghostnetv2_100": lambda **kwargs: ghostnetv2(0.5, backend=None, **kwargs),
        "ghostnet_100": lambda **kwargs: nn.Sequential(reference.GhostModuleV2(3, 8, mode="original"),
                                                       reference.GhostModuleV2(8, 6, mode="original", relu=False)),
        "resnet18": lambda **kwargs: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
    }

    def create_model(model_name, **kwargs):
        return registry._model_entrypoints[model_name.split(".")[0]](**kwargs)

    timm.create_model = create_model
    timm.models = timm_models
    setattr(timm_models, registry_module.rsplit(".", 1)[1], registry)
    for name, module in (("timm", timm), ("timm.models", timm_models), (registry_module, registry)):
        monkeypatch.setitem(sys.modules, name, module)
    return registry._model_entrypoints


@pytest.mark.parametrize("registry_module", ["timm.models._registry", "timm.models.registry"],
                         ids=["timm>=0.9", "timm<0.9"])
def test_patch_and_unpatch_fake_timm(monkeypatch, registry_module):
    entrypoints = _fake_timm(monkeypatch, registry_module)
    originals = dict(entrypoints)
    timm = sys.modules["timm"]
    assert ghostfused.patch_timm(backend="eager") == ["ghostnet_100", "ghostnetv2_100"]
    try:
        model = timm.create_model("ghostnetv2_100.in1k", num_classes=7)  # a pretrained tag, keyword arguments
        assert model.classifier.out_features == 7
        assert len(fused_modules(model)) == 32 and all(m.backend == "eager" for m in fused_modules(model))
        assert len(fused_modules(timm.create_model("ghostnet_100"))) == 2
        assert entrypoints["resnet18"] is originals["resnet18"]
        assert entrypoints["ghostnetv2_100"].__name__ == originals["ghostnetv2_100"].__name__
        # Patching again (another backend) replaces the patch rather than wrapping it.
        assert ghostfused.patch_timm(backend="auto", models=["ghostnetv2_100", "not_a_model"]) == ["ghostnetv2_100"]
        assert ghostfused.patch_timm(backend="auto", models="ghostnetv2_100") == ["ghostnetv2_100"]
        assert all(m.backend == "auto" for m in fused_modules(timm.create_model("ghostnetv2_100")))
        assert entrypoints["ghostnetv2_100"].__ghostfused_original__ is originals["ghostnetv2_100"]
    finally:
        assert sorted(ghostfused.unpatch_timm()) == ["ghostnet_100", "ghostnetv2_100"]
    assert entrypoints == originals
    assert not fused_modules(timm.create_model("ghostnetv2_100"))
    assert ghostfused.unpatch_timm() == []


def test_fused_output_can_be_updated_in_place():
    """timm's GhostBottleneck adds the shortcut to ghost2's output in place (``x += self.shortcut(shortcut)``)."""
    model = randomize_batch_norms(reference.GhostModuleV2(4, 6, mode="original", relu=False)).train()
    fused = ghostfused.convert(copy.deepcopy(model))
    x = torch.randn(2, 4, 5, 7)
    results = []
    for module in (model, fused):
        x_grad = x.clone().requires_grad_()
        out = module(x_grad)
        out += 1.0
        out.square().sum().backward()
        results.append((out.detach(), x_grad.grad))
    torch.testing.assert_close(results[1], results[0])


def test_patch_timm_without_timm_is_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match="timm"):
        ghostfused.patch_timm()


def test_patch_timm_checks_the_backend(monkeypatch):
    _fake_timm(monkeypatch)
    with pytest.raises(ValueError, match="unknown backend"):
        ghostfused.patch_timm(backend="fast")


# ---------------------------------------------------------------------------------------------------------------
# The real timm (where it imports)


@pytest.fixture
def timm():
    try:
        import timm
    except Exception as error:  # torchvision's compiled ops fail to load with the CPU torch: a RuntimeError
        pytest.skip(f"timm does not import here ({type(error).__name__}: {error}); these tests run on the GPU "
                    f"machine")
    return timm


def _timm_model(timm, name, device="cpu"):
    return randomize_batch_norms(timm.create_model(name, pretrained=False, num_classes=10)).to(device)


def _assert_fused_matches_timm(model, fused, device):
    """Eval outputs, then one training step: outputs, parameter gradients, running statistics."""
    tolerance = 1e-2 if device == "cuda" else 2e-4  # TF32 on either side on a GPU
    x = torch.randn(2, 3, 64, 48, device=device)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), model.eval()(x), rtol=tolerance, atol=tolerance)
    model.train()
    fused.train()
    torch.manual_seed(1)  # the same dropout mask
    expected = model(x)
    torch.manual_seed(1)
    actual = fused(x)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    actual.backward(grad)
    expected_params = dict(model.named_parameters())
    for name, param in fused.named_parameters():  # gradients summed through a deep network, some of them ~0
        expected_grad = expected_params[name].grad
        atol = max(1e-5, 10 * tolerance * expected_grad.abs().max().item())
        torch.testing.assert_close(param.grad, expected_grad, rtol=10 * tolerance, atol=atol,
                                   msg=lambda m: f"grad {name}: {m}")
    expected_buffers = dict(model.named_buffers())
    for name, buf in fused.named_buffers():
        torch.testing.assert_close(buf, expected_buffers[name], rtol=tolerance, atol=tolerance,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", TIMM_GHOSTNETS)
def test_convert_fuses_timm_ghostnets(timm, name):
    model = _timm_model(timm, name)
    fused = ghostfused.convert(copy.deepcopy(model))
    modules = fused_modules(fused)
    assert len(modules) == 32
    assert sum(m.mode == "attn" for m in modules) == (14 if name.startswith("ghostnetv2") else 0)
    assert list(fused.state_dict()) == list(model.state_dict())
    _assert_fused_matches_timm(model, fused, "cpu")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("name", ["ghostnet_100", "ghostnetv2_100"])
def test_convert_fuses_timm_ghostnets_on_gpu(timm, backend, name):
    model = _timm_model(timm, name, "cuda")
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    _assert_fused_matches_timm(model, fused, "cuda")


def test_patch_timm_with_the_real_timm(timm):
    assert "ghostnetv2_100" in ghostfused.patch_timm(backend="eager")
    try:
        assert len(fused_modules(timm.create_model("ghostnetv2_100"))) == 32
        assert len(fused_modules(timm.create_model("ghostnet_100"))) == 32
    finally:
        ghostfused.unpatch_timm()
    assert not fused_modules(timm.create_model("ghostnetv2_100"))


def test_timm_ghostnetv3_is_left_unfused_with_warnings(timm):
    if "ghostnetv3_050" not in timm.list_models("ghostnetv3*"):
        pytest.skip(f"timm {timm.__version__} has no GhostNetV3")
    model = _timm_model(timm, "ghostnetv3_050").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = ghostfused.convert(copy.deepcopy(model))
    assert not fused_modules(fused)
    assert caught and all("unfused" in str(w.message) for w in caught)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x))
