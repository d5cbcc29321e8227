"""The cases of the op microbenchmarks (``pytest benchmarks/``): shapes, providers, correctness check, timing.

A case is one op (``ghost_concat``, ``dfc_attention``, ``ghost_attn``) on one Ghost-module shape of
``ghostnetv2_100`` at 224x224 (found with forward hooks on the model itself), at one batch size, in train or eval
mode, forward only or forward + backward. A provider runs it: ``eager`` (the reference module), ``compile``
(``torch.compile`` of it), or a fused backend through ``ghostfused.ops``.
"""

import copy
import dataclasses
import functools
import statistics
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import ghostfused
from ghostfused import benchmark, ops, reference
from ghostfused.testing import randomize_batch_norms

OPS = ("ghost_concat", "dfc_attention", "ghost_attn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest relative error ||out - ref|| / ||ref|| against a float64 eager reference, per dtype; a provider passes
# when its error is below this or below 3x eager's own error in the same dtype (TF32 and half precisions).
TOLERANCES = {torch.float32: 5e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
EAGER_LIMITS = {torch.float32: 1e-2, torch.bfloat16: 0.2, torch.float16: 0.05}  # eager's own error, TF32 included
RESOLUTION = 224


@dataclasses.dataclass(frozen=True)
class Shape:
    """One distinct Ghost module of the model: its name (the first with this shape), mode and sizes."""

    module: str
    mode: str
    inp: int
    oup: int
    height: int
    width: int
    relu: bool

    @property
    def id(self) -> str:
        return f"{self.inp}x{self.height}x{self.width}to{self.oup}{'' if self.relu else 'lin'}"


@functools.cache
def model_shapes(width: float = 1.0, resolution: int = RESOLUTION) -> tuple[Shape, ...]:
    """The distinct Ghost-module shapes of ``ghostnetv2`` (``width``) at ``resolution``, in call order."""
    model = ghostfused.models.ghostnetv2(width, backend=None).eval()
    shapes = {}
    for name, module, (_, inp, height, width_) in benchmark.ghost_module_inputs(
            model, torch.randn(1, 3, resolution, resolution)):
        shape = Shape(name, module.mode, inp, module.oup, height, width_, isinstance(module.primary_conv[2], nn.ReLU))
        shapes.setdefault(dataclasses.replace(shape, module=""), shape)
    return tuple(shapes.values())


def op_shapes(op: str, full: bool) -> list[Shape]:
    """The shapes of ``op``: 'original' modules for ghost_concat, 'attn' ones for the others; without ``full``
    only the first (largest resolution) and the last (7x7) of them."""
    shapes = [s for s in model_shapes() if (s.mode == "original") == (op == "ghost_concat")]
    return shapes if full else [shapes[0], shapes[-1]]


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: Shape
    batch_size: int
    training: bool
    backward: bool

    @property
    def id(self) -> str:
        return (f"{self.op}-{self.shape.id}-b{self.batch_size}-{'train' if self.training else 'eval'}-"
                f"{'fwdbwd' if self.backward else 'fwd'}")

    @property
    def group(self) -> str:
        return (f"{self.op} {self.shape.module} {self.shape.id} b{self.batch_size} "
                f"{'train' if self.training else 'eval'} {'fwd+bwd' if self.backward else 'fwd'}")


def cases(full: bool, batch_sizes: tuple[int, ...]) -> list[Case]:
    return [Case(op, shape, batch_size, training, backward) for op in OPS for shape in op_shapes(op, full)
            for batch_size in batch_sizes for training in (False, True) for backward in (False, True)]


def default_providers(device: torch.device) -> list[str]:
    """eager, compile on GPUs (a cold compile per case takes tens of seconds on CPU), each fused backend."""
    return ["eager"] + (["compile"] if device.type == "cuda" else []) + benchmark.fused_backends(device)


class EagerDFCAttention(nn.Module):
    """The DFC attention of a reference 'attn' Ghost module alone, as its forward composes it:
    ``features * nearest_upsample(sigmoid(short_conv(avg_pool2x2(x))))``."""

    def __init__(self, module: reference.GhostModuleV2):
        super().__init__()
        self.short_conv, self.gate_fn = module.short_conv, module.gate_fn

    def forward(self, x, features):
        gate = self.gate_fn(self.short_conv(F.avg_pool2d(x, kernel_size=2, stride=2)))
        return features * F.interpolate(gate, size=features.shape[-2:], mode="nearest")


class FusedDFCAttention(nn.Module):
    """``ghostfused.ops.dfc_attention`` on a reference 'attn' Ghost module's ``short_conv``."""

    def __init__(self, module: reference.GhostModuleV2, backend: str):
        super().__init__()
        self.short_conv, self.backend = module.short_conv, backend

    def forward(self, x, features):
        s = self.short_conv
        return ops.dfc_attention(x, features, s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5],
                                 training=s[1].training, backend=self.backend)


def reference_module(case: Case, device: torch.device, dtype: torch.dtype) -> reference.GhostModuleV2:
    """The case's reference Ghost module with seeded weights and non-trivial BatchNorm state."""
    torch.manual_seed(0)
    shape = case.shape
    module = randomize_batch_norms(reference.GhostModuleV2(shape.inp, shape.oup, mode=shape.mode, relu=shape.relu))
    return module.to(device=device, dtype=dtype).train(case.training)


def inputs(case: Case, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """x [N, inp, H, W], plus features [N, oup, H, W] for dfc_attention (seeded, standard normal)."""
    generator = torch.Generator(device=device).manual_seed(1)
    n, shape = case.batch_size, case.shape
    sizes = [(n, shape.inp, shape.height, shape.width)]
    if case.op == "dfc_attention":
        sizes.append((n, shape.oup, shape.height, shape.width))
    # drawn in float32 and cast, so that every dtype (float64 for the reference) gets the same values
    return [torch.randn(size, device=device, generator=generator).to(dtype) for size in sizes]


def provider_module(case: Case, provider: str, module: reference.GhostModuleV2) -> nn.Module:
    """The module that runs ``case`` for ``provider`` ('eager', 'compile', 'eager-ops' or a fused backend), on a copy
    of ``module`` (its own BatchNorm state)."""
    module = copy.deepcopy(module)
    if provider == benchmark.EAGER_BACKEND_PROVIDER:
        provider = "eager"  # the ops on the eager backend
    elif provider in ("eager", "compile"):
        eager = EagerDFCAttention(module) if case.op == "dfc_attention" else module
        if provider == "compile":
            torch._dynamo.reset()  # each case compiles afresh instead of exhausting the recompile limit
            return torch.compile(eager)
        return eager
    if case.op == "dfc_attention":
        return FusedDFCAttention(module, provider)
    return ghostfused.nn.GhostModuleV2.from_module(module, provider)


class Runner:
    """One call of a case: forward (under no_grad), or forward and backward of a fixed upstream gradient."""

    def __init__(self, case: Case, module: nn.Module, tensors: list[torch.Tensor]):
        self.module, self.backward = module, case.backward
        self.tensors = [t.detach().clone().requires_grad_(case.backward) for t in tensors]
        self.grad_out = None

    def __call__(self):
        if not self.backward:
            with torch.no_grad():
                return self.module(*self.tensors)
        for t in self.tensors:
            t.grad = None
        out = self.module(*self.tensors)
        if self.grad_out is None:
            generator = torch.Generator(device=out.device).manual_seed(2)
            self.grad_out = torch.randn(out.shape, device=out.device, generator=generator).to(out.dtype)
        out.backward(self.grad_out)
        return out

    def results(self) -> list[torch.Tensor]:
        """The output of one fresh call, then (with backward) the input gradients and all parameter gradients as
        one vector (one relative error for them all: some, like a BatchNorm bias followed by another BatchNorm,
        nearly cancel and carry no precision of their own in half precision)."""
        parameters = list(self.module.parameters())
        for p in parameters:
            p.grad = None
        out = self()
        if not self.backward:
            return [out]
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in parameters]
        return [out] + [t.grad for t in self.tensors] + [torch.cat(grads)]


def errors(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    return [benchmark.relative_error(a, e) if e is not None and a is not None else float(a is not e)
            for a, e in zip(actual, expected)]


def runner(case: Case, provider: str, device: torch.device, dtype: torch.dtype) -> "Runner":
    """A fresh seeded module and inputs for ``case``, run by ``provider``."""
    module = reference_module(case, device, dtype)
    return Runner(case, provider_module(case, provider, module), inputs(case, device, dtype))


@functools.lru_cache(maxsize=1)  # the providers of one case run one after another; a case can be large
def _eager_reference(case: Case, device_type: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[float]]:
    """Eager in float64 (the reference), and eager's own errors in ``dtype`` against it."""
    device = torch.device(device_type)
    expected = runner(case, "eager", device, torch.float64).results()
    eager_errors = errors(runner(case, "eager", device, dtype).results(), expected)
    if not max(eager_errors) <= EAGER_LIMITS[dtype]:  # the comparison itself would be meaningless
        raise AssertionError(f"{case.id}: eager in {dtype} is {max(eager_errors):.2e} from float64 eager")
    return expected, eager_errors


def check(case: Case, provider: str, run: "Runner", device: torch.device, dtype: torch.dtype) -> float:
    """The largest relative error of ``run``'s output and gradients (a fresh :func:`runner`) against float64
    eager; raises AssertionError above the dtype's tolerance or 3x eager's own error, whichever is larger."""
    expected, eager_errors = _eager_reference(case, device.type, dtype)
    actual = errors(run.results(), expected)
    allowed = [max(TOLERANCES[dtype], 3 * e) for e in eager_errors]
    failing = [i for i, (a, limit) in enumerate(zip(actual, allowed)) if not a <= limit]
    if failing:
        names = ["out", *(["grad x", "grad features"][:len(actual) - 2]), "grad parameters"][:len(actual)]
        raise AssertionError(f"{case.id} [{provider}]: " + ", ".join(
            f"{names[i]} error {actual[i]:.2e} > {allowed[i]:.2e}" for i in failing))
    return max(actual)


def gpu_median_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` on the GPU with ``triton.testing.do_bench`` (CUDA events otherwise)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return 1e3 * statistics.median(benchmark.time_calls(fn, torch.device("cuda"), warmup=5, iters=30))
    return do_bench(fn, warmup=10, rep=40, return_mode="median")
