"""The triton backend's kernels against the eager reference, beyond the generic suite (tests/test_ops.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), in float64
and float32, on small shapes; outputs are NaN-poisoned before each launch. Tests marked ``gpu`` run on a CUDA device
(bfloat16 / float16, the shapes of ghostnetv2_100) and are skipped elsewhere.
"""

import copy
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ghostfused
from ghostfused import backends, reference

from helpers import (OP_CASES, assert_close, assert_modules_match, bn_index, case_arguments,
                     compare_op_with_reference, fused_copy, ghost_module, op_arguments, run_step)

pytestmark = pytest.mark.skipif(backends.unavailable_reason("triton") is not None, reason="triton cannot run here")

GPU = torch.cuda.is_available()


def _triton(op):
    return importlib.import_module(f"ghostfused.triton.{op}")


def compare_with_reference(op, args, dtype, scale=1.0):
    """Forward (output, statistics, layout) and every gradient of the triton op against the eager backend."""
    compare_op_with_reference(op, args, dtype, _triton(op).forward, _triton(op).backward, scale)


@pytest.mark.parametrize("op", ["ghost_attn", "dfc_attention", "ghost_concat"])
@pytest.mark.parametrize("case", list(OP_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_matches_reference_float64(op, case, training):
    compare_with_reference(op, case_arguments(op, case, training), torch.float64)


@pytest.mark.parametrize("op", ["ghost_attn", "dfc_attention", "ghost_concat"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_matches_reference_float32(op, training):
    options = {} if op == "ghost_concat" else dict(upsample="bilinear")
    compare_with_reference(op, op_arguments(op, 2, 6, 9, 5, 6, training, dtype=torch.float32, **options),
                           torch.float32)


@pytest.mark.parametrize("op", ["ghost_attn", "dfc_attention"])
def test_several_tiles_and_channel_blocks(op):
    """Shapes past one tile and one channel block: 2 x 70 x 24 x 24 -> 70 channels (loops over 64-channel chunks,
    3 blocks of 32 channels, 5 pixel tiles), so tile partials and chunked reductions are exercised."""
    options = dict(upsample="bilinear") if op == "dfc_attention" else {}
    compare_with_reference(op, op_arguments(op, 2, 70, 70, 24, 24, True, **options), torch.float64)


def test_features_in_another_layout():
    args = op_arguments("dfc_attention", 2, 3, 4, 5, 6, True)
    args[1] = args[1].contiguous(memory_format=torch.channels_last)
    compare_with_reference("dfc_attention", args, torch.float64)


def test_inputs_with_arbitrary_strides():
    args = op_arguments("ghost_attn", 2, 3, 4, 10, 6, True)
    args[0] = args[0][:, :, ::2]  # non-dense view, handled (made dense) like eager
    compare_with_reference("ghost_attn", args, torch.float64)


@pytest.mark.parametrize("op", ["ghost_attn", "dfc_attention", "ghost_concat"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_launches_nothing(op, training, monkeypatch):
    from ghostfused.triton import stages

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for an empty batch")

    monkeypatch.setattr(stages, "_project", no_launch)
    args = op_arguments(op, 0, 3, 4, 4, 5, training)
    out, mean, var = _triton(op).forward(*args)
    ref_out, ref_mean, ref_var, _ = backends.implementation("eager", op).forward(*args)
    assert out.shape == ref_out.shape
    torch.testing.assert_close((mean, var), (ref_mean, ref_var))
    grads = _triton(op).backward(torch.zeros_like(out), *args)
    for grad, tensor in zip(grads, [a for a in args if isinstance(a, torch.Tensor)]):
        assert grad.shape == tensor.shape and not grad.any()
    assert not grads[-1].any() and not grads[-2].any()


def test_training_is_deterministic():
    args = op_arguments("ghost_attn", 3, 4, 6, 7, 6, True, upsample="bilinear")
    first = _triton("ghost_attn").forward(*args)
    second = _triton("ghost_attn").forward(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    b = bn_index("ghost_attn")
    sizes = [w.shape[0] for w in args[b]]
    args[b + 2], args[b + 3] = list(first[1].split(sizes)), list(first[2].split(sizes))
    grad = torch.randn_like(first[0])
    for a, b in zip(_triton("ghost_attn").backward(grad, *args), _triton("ghost_attn").backward(grad, *args)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsampling_tables_reproduce_interpolate(mode):
    """The owner / weight / children tables give exactly F.interpolate's result (nearest), or within rounding."""
    from ghostfused.triton.common import upsampling

    for H, W in [(2, 3), (3, 2), (5, 7), (7, 7), (9, 4), (14, 14), (15, 11), (28, 31), (56, 56), (113, 57)]:
        h, w = H // 2, W // 2
        tables = upsampling(H, W, h, w, mode, torch.float64, torch.device("cpu"))
        gate = torch.randn(h, w, dtype=torch.float64)
        r, c = tables.owner_r.long(), tables.owner_c.long()
        lr, lc = tables.lam_r[:, None], tables.lam_c[None, :]
        r1, c1 = (r + 1).clamp(max=h - 1), (c + 1).clamp(max=w - 1)
        rebuilt = ((1 - lr) * (1 - lc) * gate[r][:, c] + lr * (1 - lc) * gate[r1][:, c]
                   + (1 - lr) * lc * gate[r][:, c1] + lr * lc * gate[r1][:, c1])
        options = dict(align_corners=False) if mode == "bilinear" else {}
        expected = F.interpolate(gate[None, None], size=(H, W), mode=mode, **options)[0, 0]
        if mode == "nearest":
            assert torch.equal(rebuilt, expected), (H, W)
        else:
            torch.testing.assert_close(rebuilt, expected, rtol=1e-12, atol=1e-12, msg=f"{(H, W)}")
        children = tables.children.view(h * w, tables.ch)
        pixels = children[children >= 0]
        assert torch.equal(pixels.sort().values, torch.arange(H * W, dtype=pixels.dtype)), (H, W)
        owners = (r[pixels.long() // W] * w + c[pixels.long() % W])
        cells = torch.arange(h * w).repeat_interleave((children >= 0).sum(1))
        assert torch.equal(owners, cells), (H, W)


def _module_options():
    return dict(dfc_kernel_size=3, upsample="bilinear", ratio=3, dw_size=5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_training_steps_and_running_statistics(momentum):
    reference_module = ghost_module(3, 7, mode="attn", **_module_options()).train()
    for bn in reference_module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = momentum
    fused = fused_copy(reference_module, "triton")
    for step in range(3):
        x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
        if step == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(2, 7, 5, 6, dtype=torch.float64)
        expected, expected_dx = run_step(reference_module, x, grad)
        actual, actual_dx = run_step(fused, x, grad)
        assert_close(actual, expected, torch.float64, f"output, step {step}")
        assert_close(actual_dx, expected_dx, torch.float64, f"input gradient, step {step}")
    assert_modules_match(reference_module, fused, torch.float64)
    assert int(fused.short_conv[5].num_batches_tracked) == 3
    fused.eval()
    reference_module.eval()
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
    assert_close(fused(x), reference_module(x), torch.float64, "eval output after training")


@pytest.mark.parametrize("op", ["ghost_attn", "dfc_attention", "ghost_concat"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(op, training):
    """Gradients by finite differences (fast mode), with bilinear upsampling, K = 3, odd oup, ratio 3, no ReLU
    (tests/test_ops.py covers the default configuration)."""
    ratio = 2 if op == "dfc_attention" else 3
    args = op_arguments(op, 2, 2, 5, 4, 5, training, k=3, ratio=ratio, relu=False, upsample="bilinear")
    b = bn_index(op)
    bn_mean, bn_var = args[b + 2], args[b + 3]
    tensors = [a for a in args[:b]] + args[b] + args[b + 1]

    def function(*inputs):
        call = list(inputs[:b]) + [list(inputs[b:b + len(bn_mean)]), list(inputs[b + len(bn_mean):]), bn_mean,
                                   bn_var] + args[b + 4:]
        return getattr(torch.ops.ghostfused, op)(*call, "triton")[0]

    inputs = [t.detach().requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_benchmark_byte_count():
    """benchmarks/triton_ops.py imports without a GPU; its floor counts x and the output once (checked by hand)."""
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "triton_ops.py"
    spec = importlib.util.spec_from_file_location("triton_ops_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = bench.ModuleShape(24, 72, 56, 56, "attn")
    # 8 images of 56 * 56 pixels, 24 channels read + 72 written, 2 bytes each
    assert bench.floor_bytes("ghost_attn", 8, shape, 2) == 8 * 3136 * (24 + 72) * 2
    # dfc_attention also reads features (72 channels)
    assert bench.floor_bytes("dfc_attention", 8, shape, 2) == 8 * 3136 * (24 + 72 + 72) * 2
    # forward + backward also reads grad_out (72) and x (24) and writes grad_x (24)
    assert bench.floor_bytes("ghost_attn", 1, shape, 4, backward=True) == 3136 * (24 + 72 + 72 + 24 + 24) * 4
    shapes = bench.ghostnetv2_shapes()
    attn = [(s.inp, s.oup, s.height) for s in shapes if s.mode == "attn"]
    assert attn == [(24, 72, 56), (40, 120, 28), (40, 240, 28), (80, 200, 14), (80, 184, 14), (80, 480, 14),
                    (112, 672, 14), (160, 960, 7)]


def compile_launches(cases) -> list[str]:
    """Compile, for sm_90 and without a GPU, every kernel the given (op, dtype, training, channels_last, upsample)
    calls launch, with the first autotune config; returns the failures. Needs TRITON_INTERPRET unset (a subprocess)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from ghostfused.triton import stages

    names = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.int32: "i32", torch.int64: "i64"}
    failures, done = [], set()

    def compile_kernel(fn, args, kwargs, options):
        bound = dict(zip(fn.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for param, name in zip(fn.params, fn.arg_names):
            value = bound[name]
            if param.is_constexpr:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + names[value.dtype]
            else:
                signature[name] = {bool: "i1", int: "i32", float: "fp32"}[type(value)]
        key = (fn.fn.__name__, str(sorted(signature.items())), str(sorted(constexprs.items())))
        if key not in done:
            done.add(key)
            try:
                triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                               target=GPUTarget("cuda", 90, 32), options=options)
            except Exception as error:  # noqa: BLE001 (every failure is reported)
                failures.append(f"{fn.fn.__name__} {constexprs}: {error}")

    def autotuned(self, *args, **kwargs):
        config = self.configs[0]
        compile_kernel(self.fn, args, {**kwargs, **config.kwargs}, dict(num_warps=config.num_warps))

    def plain(self, *args, grid, warmup, **kwargs):
        compile_kernel(self, args, kwargs, {})

    Autotuner.run, JITFunction.run = autotuned, plain  # the host code runs on CPU tensors; nothing launches
    stages._multiprocessors = lambda device: 132
    for op, dtype, training, channels_last, upsample in cases:
        options = {} if op == "ghost_concat" else dict(upsample=upsample)
        args = op_arguments(op, 4, 24, 71, 14, 13, training, dtype=dtype, channels_last=channels_last,
                            device=torch.device("cpu"), **options)
        out, mean, var = _triton(op).forward(*args)
        b = bn_index(op)
        sizes = [w.shape[0] for w in args[b]]
        args[b + 2], args[b + 3] = list(mean.split(sizes)), list(var.split(sizes))
        _triton(op).backward(torch.ones_like(out), *args)
    return failures


COMPILE_CASES = [("ghost_attn", torch.bfloat16, True, True, "bilinear"),
                 ("dfc_attention", torch.float64, False, False, "nearest"),
                 ("ghost_concat", torch.float32, True, False, "nearest")]


@pytest.mark.skipif(GPU, reason="the GPU tests compile (and run) every kernel")
def test_kernels_compile_for_sm90():
    """The interpreter accepts programs compiled Triton rejects (a loop-carried name changing type, mismatched if /
    else types): compile every kernel launched by three calls that cover all constexpr branches (bf16 / fp64 /
    fp32, train / eval, both layouts, bilinear / nearest / no gate) for sm_90, through ptxas."""
    pytest.importorskip("triton.backends.nvidia")
    code = ("import test_triton, sys; failures = test_triton.compile_launches(test_triton.COMPILE_CASES); "
            "print(*failures, sep=chr(10)); sys.exit(1 if failures else 0)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------------------
# GPU only.

@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op", ["ghost_attn", "dfc_attention", "ghost_concat"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 24, 72, 56, 56), (16, 160, 960, 7, 7), (4, 40, 120, 28, 28)],
                         ids=lambda s: "x".join(map(str, s)))
def test_half_precision_on_gpu(dtype, op, training, shape):
    """Half-precision forward and gradients against the float32 eager computation on the same rounded inputs."""
    compare_with_reference(op, op_arguments(op, *shape, training, dtype=dtype, device=torch.device("cuda")), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", ["ghost_attn", "dfc_attention", "ghost_concat"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_float32_larger_shapes_on_gpu(op, channels_last, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # eager's convolutions in full float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for shape in [(4, 24, 72, 56, 56), (8, 80, 200, 14, 14), (2, 160, 961, 7, 7), (3, 17, 33, 31, 45)]:
        for training in (True, False):
            options = {} if op == "ghost_concat" else dict(upsample="bilinear" if shape[0] == 3 else "nearest")
            args = op_arguments(op, *shape, training, dtype=torch.float32, channels_last=channels_last,
                                device=torch.device("cuda"), **options)
            compare_with_reference(op, args, torch.float32, scale=5)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_converted_network_on_gpu():
    """ghostnetv2_100 in bfloat16 converted to the triton backend: eval logits and one training step's gradients
    close to eager's (the ops take one dtype for x and weights; autocast is not handled by the op layer)."""
    from ghostfused.models import ghostnetv2
    from helpers import randomize_batch_norms

    model = randomize_batch_norms(ghostnetv2(1.0, num_classes=10, backend=None)).cuda().to(torch.bfloat16)
    fused = ghostfused.convert(copy.deepcopy(model), backend="triton")
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected, actual = model.eval()(x).float(), fused.eval()(x).float()
    torch.testing.assert_close(actual, expected, rtol=0.1, atol=0.1 * expected.abs().max().item())
    model.train()(x).float().sum().backward()
    fused.train()(x).float().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=0.1,
                                   atol=0.1 * max(1.0, q.grad.float().abs().max().item()), msg=name)
