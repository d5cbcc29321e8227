"""torch.compile of converted models: one graph (fullgraph=True, no graph break), the eager results forward and
backward, running statistics in training, dynamic shapes without a recompile per call; inductor on a GPU.

On CPU the tests compile with ``backend="aot_eager"`` (dynamo + AOT autograd, the tracing that matters for the
custom ops, without inductor's slow C++ code generation); the GPU tests use inductor.
"""

import copy

import pytest
import torch

import ghostfused
from ghostfused.models import ghostnetv2

from ecosystem_helpers import OUT_CHANNELS, cuda_backends, fused_modules, requires_cuda, two_ghost_modules
from helpers import assert_close, assert_modules_match, randomize_batch_norms, run_step


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compare_steps(model, fused, compiled, shapes, dtype=torch.float32, scale=1.0):
    """Forward and backward of the eager two_ghost_modules and the compiled fused copy on each input shape; outputs,
    input gradients, then parameter gradients and buffers (running statistics, counters) agree. Every call after the
    first must reuse the first compilation (a recompile raises)."""
    device = next(model.parameters()).device
    for i, (n, c, h, w) in enumerate(shapes):
        x = torch.randn(n, c, h, w, dtype=dtype, device=device)
        grad = torch.randn(n, OUT_CHANNELS, h, w, dtype=dtype, device=device)
        expected, expected_dx = run_step(model, x, grad)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            actual, actual_dx = run_step(compiled, x, grad)
        assert_close(actual, expected, dtype, f"output {(n, c, h, w)}", scale)
        assert_close(actual_dx, expected_dx, dtype, f"input gradient {(n, c, h, w)}", scale)
    assert_modules_match(model, fused, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compiled_ghost_modules_match_eager_in_one_graph(training):
    model = two_ghost_modules().train(training)
    fused = ghostfused.convert(copy.deepcopy(model))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    _compare_steps(model, fused, compiled, [(2, 5, 6, 7)] * 3)


def test_dynamic_shapes_compile_once():
    model = two_ghost_modules().train()
    fused = ghostfused.convert(copy.deepcopy(model))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=True)
    _compare_steps(model, fused, compiled, [(2, 5, 6, 7), (3, 5, 9, 5), (4, 5, 4, 10), (2, 5, 8, 8), (5, 5, 3, 2)])


def test_compiled_model_with_sync_batch_norm_outside_distributed_is_fused():
    """nn.SyncBatchNorm computes as BatchNorm2d without torch.distributed: still fused, still one graph."""
    model = two_ghost_modules().train()
    fused = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ghostfused.convert(copy.deepcopy(model)))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in fused.modules())
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    _compare_steps(model, fused, compiled, [(2, 5, 6, 7)] * 2)


def test_whole_model_compiles_fullgraph():
    # float64: at batch 2 the last stage's DFC BatchNorms normalise two values per channel, whose float32 backward
    # loses most of its digits (in eager PyTorch too), so float32 gradients would compare rounding, not the graph.
    model = randomize_batch_norms(ghostnetv2(0.5, num_classes=10, backend=None)).double()
    fused = ghostfused.convert(copy.deepcopy(model))
    assert len(fused_modules(fused)) == 32
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # the last stage is 2x2, the smallest the DFC pooling takes
    with torch.no_grad():
        assert_close(compiled.eval()(x), model.eval()(x), torch.float64, "whole model output")
    compiled.train()
    model.train()
    torch.manual_seed(1)  # the same dropout mask
    compiled(x).sum().backward()
    torch.manual_seed(1)
    model(x).sum().backward()
    assert_modules_match(model, fused, torch.float64, "whole model")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inductor_on_gpu_matches_eager(backend, training):
    model = two_ghost_modules().cuda().train(training)
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    compiled = torch.compile(fused, fullgraph=True)  # inductor
    # TF32 (cuDNN's default for float32 convolutions, and Triton's for tl.dot) on either side: a looser tolerance.
    _compare_steps(model, fused, compiled, [(4, 5, 14, 14), (4, 5, 14, 14)], scale=25)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_inductor_whole_model_on_gpu_matches_eager(backend):
    model = randomize_batch_norms(ghostnetv2(1.0, num_classes=10, backend=None)).cuda().eval()
    fused = ghostfused.convert(copy.deepcopy(model), backend=backend)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (2, 5):
            x = torch.randn(batch, 3, 96, 80, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-2, atol=1e-2)  # TF32 on either side
