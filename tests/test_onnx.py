"""ONNX export: a converted model exports to a graph of standard ONNX operators, and ONNX Runtime reproduces it.

While exporting, the fused ops compute their eager reference (``ghostfused.ops.define.run_fused_op``), so the
graph holds Conv, BatchNormalization, Relu, Concat, Slice, AveragePool, Sigmoid, Resize, Mul... and no ghostfused
node. torch 2.13's ``torch.onnx.export`` defaults to the dynamo exporter (``dynamo=True``, needs onnxscript); the
TorchScript exporter (``dynamo=False``) works too. Both are tested.
"""

import copy
import io
import warnings

import pytest
import torch

import ghostfused
from ghostfused.models import ghostnetv2

from ecosystem_helpers import fused_modules, two_ghost_modules
from helpers import randomize_batch_norms

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")

STANDARD_DOMAINS = ("", "ai.onnx")


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


EXPORTERS = [pytest.param(True, id="dynamo", marks=pytest.mark.skipif(
                 not _has_onnxscript(), reason="the dynamo exporter needs onnxscript (pip install onnxscript)")),
             pytest.param(False, id="torchscript")]


def _export(model, x, dynamo: bool) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"])
        return buffer.getvalue()


def _assert_standard_and_matches(model_bytes: bytes, fused, x, rtol=1e-4, atol=1e-4):
    graph = onnx.load_from_string(model_bytes).graph
    foreign = {(node.domain, node.op_type) for node in graph.node if node.domain not in STANDARD_DOMAINS}
    assert not foreign, f"non-standard ONNX operators: {foreign}"
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    actual, = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = fused(x)
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=rtol, atol=atol)
    return {node.op_type for node in graph.node}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_ghost_modules_export_to_standard_onnx(dynamo, upsample):
    model = two_ghost_modules()
    model[0].upsample = upsample
    fused = ghostfused.convert(copy.deepcopy(model)).eval()
    x = torch.randn(2, 5, 9, 6)
    op_types = _assert_standard_and_matches(_export(fused, x, dynamo), fused, x)
    assert {"Conv", "Concat", "Sigmoid", "Mul"} <= op_types, op_types
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x))  # the fused ops run again after the export


def test_whole_model_exports_and_runs_in_onnxruntime():
    """With the default (dynamo) exporter where onnxscript is installed, else the TorchScript one."""
    model = randomize_batch_norms(ghostnetv2(0.5, num_classes=10, backend=None)).eval()
    fused = ghostfused.convert(model)
    assert len(fused_modules(fused)) == 32
    x = torch.randn(1, 3, 64, 64)
    _assert_standard_and_matches(_export(fused, x, dynamo=_has_onnxscript()), fused, x)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_in_onnx_export_agrees_with_torch(dynamo):
    """``ghostfused.ops.direct.in_onnx_export`` (the fused ops' cheaper read of torch's export flags) says what
    ``torch.onnx.is_in_onnx_export`` says, during an export and outside one."""
    from ghostfused.ops.direct import in_onnx_export

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((in_onnx_export(), torch.onnx.is_in_onnx_export()))
            return x + 1

    assert in_onnx_export() is False
    _export(Probe(), torch.randn(2, 3), dynamo)
    assert seen and all(ours == theirs for ours, theirs in seen), seen
    assert any(ours for ours, _ in seen), seen  # the export ran the forward with the flag set
    assert in_onnx_export() is False
