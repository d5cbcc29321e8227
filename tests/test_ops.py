"""Every fused op on every backend that runs here, against the eager reference modules.

Forward, input and parameter gradients and running statistics, in train and eval mode, odd and non-square sizes,
contiguous and channels_last, plus gradcheck in float64 and torch.library.opcheck. Kernel outputs are NaN-poisoned
before each launch (GHOSTFUSED_POISON_OUTPUTS, set in conftest), so an unwritten element fails.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode

from torch.utils._python_dispatch import TorchDispatchMode

from ghostfused import ops
from ghostfused.ops import direct

from helpers import (PlainSubclass, assert_close, assert_modules_match, cpu_backends, fused_copy, ghost_module,
                     run_step)

BACKENDS = cpu_backends()

# (N, Cin, oup, H, W): odd, non-square, the 7x7 of the last stage, N = 1 and 3, oup odd and even.
SHAPES = [(2, 3, 5, 5, 7), (1, 4, 6, 7, 7), (3, 5, 4, 4, 9), (2, 2, 3, 2, 3)]


def _input(shape, dtype, channels_last):
    n, cin, _, h, w = shape
    x = torch.randn(n, cin, h, w, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["original", "attn"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_matches_reference(backend, mode, shape, training):
    dtype = torch.float64
    reference = ghost_module(shape[1], shape[2], mode=mode, dtype=dtype).train(training)
    fused = fused_copy(reference, backend)
    for step in range(2):  # two steps: running statistics compound
        x = _input(shape, dtype, channels_last=step == 1)
        grad = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=dtype)
        expected, expected_dx = run_step(reference, x, grad)
        actual, actual_dx = run_step(fused, x, grad)
        assert_close(actual, expected, dtype, "output")
        assert_close(actual_dx, expected_dx, dtype, "input gradient")
        assert actual.is_contiguous(memory_format=torch.channels_last if step == 1 else torch.contiguous_format)
    assert_modules_match(reference, fused, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["original", "attn"])
@pytest.mark.parametrize("options", [dict(dfc_kernel_size=3, upsample="bilinear", relu=False),
                                     dict(dfc_kernel_size=7, upsample="nearest", dw_size=5, ratio=3)],
                         ids=["k3-bilinear-norelu", "k7-dw5-ratio3"])
def test_module_options_match_reference(backend, mode, options):
    dtype = torch.float64
    reference = ghost_module(3, 7, mode=mode, dtype=dtype, **options).train()
    fused = fused_copy(reference, backend)
    x = torch.randn(2, 3, 5, 6, dtype=dtype)
    grad = torch.randn(2, 7, 5, 6, dtype=dtype)
    expected, expected_dx = run_step(reference, x, grad)
    actual, actual_dx = run_step(fused, x, grad)
    assert_close(actual, expected, dtype, "output")
    assert_close(actual_dx, expected_dx, dtype, "input gradient")
    assert_modules_match(reference, fused, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_statistics_over_steps(backend, momentum):
    dtype = torch.float64
    reference = ghost_module(3, 5, dtype=dtype).train()
    for bn in reference.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = momentum
    fused = fused_copy(reference, backend)
    for _ in range(3):
        x = torch.randn(2, 3, 5, 4, dtype=dtype)
        reference(x)
        fused(x)
    assert_modules_match(reference, fused, dtype)
    assert int(fused.short_conv[5].num_batches_tracked) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["original", "attn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(backend, mode, training):
    reference = ghost_module(3, 4, mode=mode).train(training)
    fused = fused_copy(reference, backend)
    x = torch.randn(0, 3, 4, 5, dtype=torch.float64)
    grad = torch.randn(0, 4, 4, 5, dtype=torch.float64)
    expected, expected_dx = run_step(reference, x, grad)
    actual, actual_dx = run_step(fused, x, grad)
    assert actual.shape == expected.shape == (0, 4, 4, 5)
    assert actual_dx.shape == expected_dx.shape
    assert_modules_match(reference, fused, torch.float64)


def _op_arguments(mode, n=2, cin=3, oup=5, h=5, w=6, dtype=torch.float64, training=True):
    """Arguments of the public op function for a random module, and the module."""
    module = ghost_module(cin, oup, mode="attn", dtype=dtype)
    x = torch.randn(n, cin, h, w, dtype=dtype)
    p, c, s = module.primary_conv, module.cheap_operation, module.short_conv
    if mode == "ghost_concat":
        args = (x, p[0].weight, p[1], c[0].weight, c[1], oup)
    elif mode == "dfc_attention":
        args = (x, torch.randn(n, oup, h, w, dtype=dtype), s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5])
    else:
        args = (x, p[0].weight, p[1], c[0].weight, c[1], s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5],
                oup)
    return args, module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ghost_concat", "dfc_attention", "ghost_attn"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(backend, op, training):
    args, module = _op_arguments(op, n=2, cin=2, oup=3, h=4, w=5)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = 0.0  # gradcheck reruns the op: keep the running statistics fixed
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    bn_params = [p for m in args if isinstance(m, torch.nn.BatchNorm2d) for p in (m.weight, m.bias)]
    inputs = [t.detach().requires_grad_() for t in tensors + bn_params]

    def function(*inputs):
        it = iter(inputs[:len(tensors)])
        call = [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        bns = iter(inputs[len(tensors):])
        call = [ops.BatchNorm(next(bns), next(bns), a.running_mean, a.running_var, a.num_batches_tracked,
                              a.momentum, a.eps) if isinstance(a, torch.nn.BatchNorm2d) else a for a in call]
        return getattr(ops, op)(*call, training=training, backend=backend)

    # Triton runs interpreted here, a hundred times slower than the native backends: its Jacobian is checked along
    # random directions (fast mode) instead of column by column.
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ghost_concat", "dfc_attention", "ghost_attn"])
def test_opcheck(backend, op):
    args, module = _op_arguments(op, n=2, cin=2, oup=3, h=4, w=5)
    bns = [a for a in args if isinstance(a, torch.nn.BatchNorm2d)]
    tensors = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args
               if not isinstance(a, torch.nn.BatchNorm2d)]
    lists = [[bn.weight for bn in bns], [bn.bias for bn in bns], [bn.running_mean for bn in bns],
             [bn.running_var for bn in bns], [bn.eps for bn in bns]]
    if op == "ghost_concat":
        tail = [tensors.pop(), True, True, None]  # oup, relu, training, sync_group
    elif op == "ghost_attn":
        tail = [tensors.pop(), True, "nearest", True, None]
    else:
        tail = ["nearest", True, None]
    torch.library.opcheck(getattr(torch.ops.ghostfused, op).default, (*tensors, *lists, *tail, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dfc_attention_op_matches_reference(backend):
    dtype = torch.float64
    module = ghost_module(3, 4, dtype=dtype).eval()
    x = torch.randn(2, 3, 7, 6, dtype=dtype)
    features = torch.randn(2, 4, 7, 6, dtype=dtype)
    s = module.short_conv
    out = ops.dfc_attention(x, features, s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5], backend=backend)
    expected = features * F.interpolate(torch.sigmoid(s(F.avg_pool2d(x, 2))), size=(7, 6), mode="nearest")
    assert_close(out, expected, dtype, "dfc_attention")


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inference_skips_the_dispatcher_only_when_nothing_observes_the_op(backend, training):
    """Without autograd (no_grad), compiler, tracer, dispatch mode or subclass, ``run_fused_op`` calls the op's
    implementation directly (no dispatcher round trip), as the running-statistics update does; the results (output
    and running statistics) are those of the dispatched ops."""
    module = fused_copy(ghost_module(3, 5, mode="attn", dtype=torch.float64), backend).train(training)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        with _RecordOps() as recorded:
            observed = module(x)
        observed_state = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(state)
        direct_out = module(x)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, observed_state[name], rtol=0, atol=0, msg=name)
    assert "ghostfused.ghost_attn" in recorded.names  # a dispatch mode sees the custom ops
    assert ("ghostfused.batch_norm_update_stats" in recorded.names) == training
    torch.testing.assert_close(direct_out, observed, rtol=0, atol=0)
    args = (x, torch.randn(2, requires_grad=True), "cpu")
    assert direct.unobserved(args[:1] + args[2:]) and not direct.unobserved(args)
    with torch.no_grad():
        assert direct.unobserved(args)
        assert not direct.unobserved((torch.nn.Parameter(x).as_subclass(PlainSubclass), "cpu"))
        assert not direct.unobserved((x, [x, x.as_subclass(PlainSubclass)], "cpu"))  # inside a tensor list too
        assert direct.plain_eager((x, [x, x], [1e-5, 1e-3], 3, True, None, "cpu"))
        assert not direct.plain_eager((x, object()))  # an unknown argument type: the dispatcher decides


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["original", "attn"])
def test_eager_training_runs_the_ops_own_autograd_node(backend, mode):
    """A plain eager training call runs the op's own autograd.Function (its grad_fn named after the op), not the
    custom op's autograd wrapper; under a dispatch mode the custom op runs. Both give the same output, gradients
    and running statistics, bit for bit. A second-order gradient raises (neither backward is differentiable)."""
    reference = ghost_module(3, 5, mode=mode, dtype=torch.float64).train()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    grad = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    op = "ghost_attn" if mode == "attn" else "ghost_concat"
    results = []
    for observed in (False, True):
        module = fused_copy(reference, backend)
        x_leaf = x.clone().requires_grad_()
        with _RecordOps() if observed else contextlib.nullcontext() as recorded:
            out = module(x_leaf)
            node = type(out.grad_fn).__name__
            out.backward(grad)
        assert (node == op.title().replace("_", "") + "Backward") != observed, node
        if observed:
            assert f"ghostfused.{op}" in recorded.names and f"ghostfused.{op}_backward" in recorded.names
        results.append([out, x_leaf.grad, *(p.grad for p in module.parameters()), *module.buffers()])
    for plain, observed in zip(*results):
        torch.testing.assert_close(plain, observed, rtol=0, atol=0)
    module = fused_copy(reference, backend)
    x_leaf = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(module(x_leaf), x_leaf, grad, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        dx.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_checkpointing_gives_the_same_gradients(backend):
    """torch.utils.checkpoint (non-reentrant: saved-tensor hooks that allow one unpacking) around a fused module."""
    reference = ghost_module(3, 5, mode="attn", dtype=torch.float64).train()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    grad = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    plain, checkpointed = fused_copy(reference, backend), fused_copy(reference, backend)
    expected, expected_dx = run_step(plain, x, grad)
    x_leaf = x.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(checkpointed, x_leaf, use_reentrant=False)
    out.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(x_leaf.grad, expected_dx, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(checkpointed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context", ["flop_counter", "identity_hooks", "save_on_cpu"])
def test_training_step_under_modes_and_saved_tensor_hooks(backend, context):
    """A training step under FlopCounterMode (a dispatch mode: the custom ops run) or with saved-tensor hooks active
    through forward and backward gives the plain step's output and gradients."""
    reference = ghost_module(3, 5, mode="attn", dtype=torch.float64).train()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    grad = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    plain, observed = fused_copy(reference, backend), fused_copy(reference, backend)
    expected, expected_dx = run_step(plain, x, grad)
    contexts = {"flop_counter": lambda: FlopCounterMode(display=False),
                "identity_hooks": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
                "save_on_cpu": torch.autograd.graph.save_on_cpu}
    x_leaf = x.clone().requires_grad_()
    with contexts[context]():
        out = observed(x_leaf)
        out.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(x_leaf.grad, expected_dx, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(observed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
