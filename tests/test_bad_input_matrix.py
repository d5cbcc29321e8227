"""SPEC section 5, the whole matrix: every bad input through every entry point, on every backend.

Entry points: the public ops (``ghostfused.ops.*``), ``ghostfused.nn.GhostModuleV2``, ``ghostfused.convert``,
``set_backend`` / ``use_backend``, and the raw ops ``torch.ops.ghostfused.<op>`` / ``<op>_backward`` and (when the
C++ extension has kernels for the device) ``torch.ops.ghostfused_C.<op>_forward`` / ``_backward``. A bad input
raises ValueError, TypeError or RuntimeError (the C++ checks) with a message naming the argument; inputs that are
merely unusual (non-contiguous, channels_last, expanded, an empty batch) give eager's result.

The raw-op cases run in a child process (one per device), so that a crash (a segfault, an abort, an illegal memory
access) fails the cases it hit instead of killing the test run.
"""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn

import ghostfused
from ghostfused import backends, ops

from ecosystem_helpers import cuda_backends, requires_cuda
from helpers import assert_close, cpu_backends, ghost_module

DTYPE = torch.float32
CIN, OUP, INIT = 4, 6, 3  # the base case: x [2, 4, 6, 5], an 'attn' Ghost module of 6 output channels

PUBLIC_ARGUMENTS = {
    "ghost_concat": ("x", "primary_weight", "primary_bn", "cheap_weight", "cheap_bn", "oup"),
    "dfc_attention": ("x", "features", "conv_weight", "conv_bn", "horizontal_weight", "horizontal_bn",
                      "vertical_weight", "vertical_bn"),
    "ghost_attn": ("x", "primary_weight", "primary_bn", "cheap_weight", "cheap_bn", "conv_weight", "conv_bn",
                   "horizontal_weight", "horizontal_bn", "vertical_weight", "vertical_bn", "oup"),
}
OPS = tuple(PUBLIC_ARGUMENTS)
ATTN_OPS = ("dfc_attention", "ghost_attn")
GHOST_OPS = ("ghost_concat", "ghost_attn")
WEIGHTS = ("primary_weight", "cheap_weight", "conv_weight", "horizontal_weight", "vertical_weight")
ALLOWED_ERRORS = (ValueError, TypeError, RuntimeError)


def base_values(n: int = 2, h: int = 6, w: int = 5, device: str = "cpu") -> dict:
    """Every public argument of the three ops for one random 'attn' Ghost module."""
    module = ghost_module(CIN, OUP, dtype=DTYPE).to(device)
    p, c, s = module.primary_conv, module.cheap_operation, module.short_conv
    return dict(x=torch.randn(n, CIN, h, w, dtype=DTYPE, device=device),
                features=torch.randn(n, OUP, h, w, dtype=DTYPE, device=device),
                primary_weight=p[0].weight.detach(), primary_bn=p[1], cheap_weight=c[0].weight.detach(),
                cheap_bn=c[1], conv_weight=s[0].weight.detach(), conv_bn=s[1],
                horizontal_weight=s[2].weight.detach(), horizontal_bn=s[3], vertical_weight=s[4].weight.detach(),
                vertical_bn=s[5], oup=OUP)


def public_call(op: str, values: dict, backend: str, training: bool = True, **flags):
    return getattr(ops, op)(*[values[name] for name in PUBLIC_ARGUMENTS[op]], training=training, backend=backend,
                            **flags)


def bn_state(bn, **changes) -> ops.BatchNorm:
    """``bn``'s state as an ``ops.BatchNorm`` with some fields replaced."""
    return ops.BatchNorm.of(bn)._replace(**changes)


@dataclass(frozen=True)
class Case:
    """One input: ``change(values)`` edits the arguments in place; ``error`` is None for inputs that must work, else
    the exception type and a regex its message must match. ``ops`` limits the ops it applies to."""

    name: str
    change: Callable[[dict], None]
    error: type | None = None
    pattern: str = ""
    ops: tuple = OPS
    training: bool = True


def _set(**values):
    """Replace the named arguments (those the op has) by values or by functions of the arguments."""
    def change(v):
        for name, value in values.items():
            if name in v:
                v[name] = value(v) if isinstance(value, types.FunctionType) else value
    return change


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a non-dense view (every other element of the last dimension of a wider tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _bn_with(name: str, **fields):
    """Replace BatchNorm ``name`` by its state with ``fields(tensor)`` applied."""
    return lambda v: v.__setitem__(name, bn_state(v[name], **{f: fn(getattr(v[name], f)) for f, fn in fields.items()}))


PUBLIC_CASES = [
    # wrong rank
    Case("x-3d", _set(x=lambda v: v["x"][0]), ValueError, r"x must be 4-D"),
    Case("x-5d", _set(x=lambda v: v["x"][None]), ValueError, r"x must be 4-D"),
    Case("x-not-tensor", _set(x=lambda v: v["x"].tolist()), TypeError, r"x must be a torch.Tensor"),
    Case("primary_weight-2d", _set(primary_weight=lambda v: v["primary_weight"].flatten(1)), ValueError,
         r"primary_weight must be a 4-D", GHOST_OPS),
    Case("primary_weight-not-tensor", _set(primary_weight=1.0), TypeError, r"primary_weight must be a torch.Tensor",
         GHOST_OPS),
    Case("primary_weight-no-channels", _set(primary_weight=torch.randn(0, CIN, 1, 1)), ValueError,
         r"primary_weight must have at least one output channel", GHOST_OPS),
    Case("cheap_weight-3d", _set(cheap_weight=lambda v: v["cheap_weight"][0]), ValueError,
         r"cheap_weight must be a 4-D", GHOST_OPS),
    Case("conv_weight-2d", _set(conv_weight=lambda v: v["conv_weight"].flatten(1)), ValueError,
         r"conv_weight must (be a 4-D|have shape)", ATTN_OPS),
    Case("horizontal_weight-3d", _set(horizontal_weight=lambda v: v["horizontal_weight"][0]), ValueError,
         r"horizontal_weight must have shape", ATTN_OPS),
    Case("vertical_weight-2d", _set(vertical_weight=lambda v: v["vertical_weight"].flatten(1)), ValueError,
         r"vertical_weight must have shape", ATTN_OPS),
    Case("features-3d", _set(features=lambda v: v["features"][0]), ValueError, r"features must be 4-D",
         ("dfc_attention",)),
    Case("bn-weight-2d", _bn_with("cheap_bn", weight=lambda t: t[None]), ValueError,
         r"cheap_bn.weight must have shape", GHOST_OPS),
    # wrong channel counts
    Case("x-channels", _set(x=lambda v: torch.randn(2, CIN + 1, 6, 5)), ValueError,
         r"(primary_weight|conv_weight) must have shape"),
    Case("cheap_weight-channels", _set(cheap_weight=torch.randn(INIT + 1, 1, 3, 3)), ValueError,
         r"cheap_weight must have shape", GHOST_OPS),
    Case("cheap_weight-even-kernel", _set(cheap_weight=torch.randn(INIT, 1, 4, 4)), ValueError,
         r"cheap_weight must have shape .*dw odd", GHOST_OPS),
    Case("conv_weight-channels", _set(conv_weight=torch.randn(OUP + 1, CIN, 1, 1)), ValueError,
         r"(conv_weight|features) must have shape", ATTN_OPS),
    Case("horizontal_weight-even-kernel", _set(horizontal_weight=torch.randn(OUP, 1, 1, 4)), ValueError,
         r"horizontal_weight must have shape \[C, 1, 1, K\] with K odd", ATTN_OPS),
    Case("vertical_weight-kernel", _set(vertical_weight=torch.randn(OUP, 1, 3, 1)), ValueError,
         r"vertical_weight must have shape", ATTN_OPS),
    Case("features-channels", _set(features=torch.randn(2, OUP + 1, 6, 5)), ValueError, r"features must have shape",
         ("dfc_attention",)),
    Case("features-size", _set(features=torch.randn(2, OUP, 6, 4)), ValueError, r"features must have shape",
         ("dfc_attention",)),
    Case("primary_bn-channels", _set(primary_bn=nn.BatchNorm2d(INIT + 1)), ValueError,
         r"primary_bn.weight must have shape", GHOST_OPS),
    Case("vertical_bn-channels", _set(vertical_bn=nn.BatchNorm2d(OUP - 1)), ValueError,
         r"vertical_bn.weight must have shape", ATTN_OPS),
    Case("oup-too-large", _set(oup=2 * INIT + 1), ValueError, r"oup must be in", GHOST_OPS),
    Case("oup-too-small", _set(oup=INIT - 1), ValueError, r"oup must be in", GHOST_OPS),
    # dtypes
    Case("x-int", _set(x=lambda v: v["x"].long()), TypeError, r"x must be float16, bfloat16, float32 or float64"),
    Case("x-bool", _set(x=lambda v: v["x"] > 0), TypeError, r"x must be float"),
    Case("x-complex", _set(x=lambda v: v["x"].to(torch.complex64)), TypeError, r"x must be float"),
    Case("x-float64-weights-float32", _set(x=lambda v: v["x"].double()), TypeError,
         r"(primary_weight|features) must have x's dtype"),
    Case("primary_weight-int", _set(primary_weight=lambda v: v["primary_weight"].int()), TypeError,
         r"primary_weight must have x's dtype", GHOST_OPS),
    Case("features-float64", _set(features=lambda v: v["features"].double()), TypeError,
         r"features must have x's dtype", ("dfc_attention",)),
    Case("horizontal_weight-float16", _set(horizontal_weight=lambda v: v["horizontal_weight"].half()), TypeError,
         r"horizontal_weight must have x's dtype", ATTN_OPS),
    Case("bn-float16", _bn_with("cheap_bn", bias=lambda t: t.half()), TypeError, r"cheap_bn.bias must be", GHOST_OPS),
    Case("bn-int-running-mean", _bn_with("conv_bn", running_mean=lambda t: t.long()), TypeError,
         r"conv_bn.running_mean must be", ATTN_OPS),
    Case("bn-float32-with-float64-x", _set(**{name: (lambda name: lambda v: v[name].double())(name) for name in
                                              ("x", "features", *WEIGHTS)}), TypeError,
         r"(primary_bn|conv_bn).weight must be torch.float64 for x of torch.float64, got torch.float32"),
    Case("oup-float", _set(oup=float(OUP)), TypeError, r"oup must be an int", GHOST_OPS),
    Case("oup-bool", _set(oup=True), TypeError, r"oup must be an int", GHOST_OPS),
    # devices (meta stands in for a second device)
    Case("x-meta", _set(x=lambda v: v["x"].to("meta")), ValueError,
         r"(primary_weight|features) is on cpu but x is on meta"),
    Case("primary_weight-meta", _set(primary_weight=lambda v: v["primary_weight"].to("meta")), ValueError,
         r"primary_weight is on meta but x is on cpu", GHOST_OPS),
    Case("features-meta", _set(features=lambda v: v["features"].to("meta")), ValueError,
         r"features is on meta but x is on cpu", ("dfc_attention",)),
    Case("vertical_weight-meta", _set(vertical_weight=lambda v: v["vertical_weight"].to("meta")), ValueError,
         r"vertical_weight is on meta but x is on cpu", ATTN_OPS),
    Case("bn-meta", _bn_with("horizontal_bn", running_var=lambda t: t.to("meta")), ValueError,
         r"horizontal_bn.running_var is on meta but x is on cpu", ATTN_OPS),
    # sizes
    Case("h1-attn", _set(x=lambda v: v["x"][:, :, :1], features=lambda v: v["features"][:, :, :1]), ValueError,
         r"x must have H >= 2 and W >= 2", ATTN_OPS),
    Case("w1-attn", _set(x=lambda v: v["x"][..., :1], features=lambda v: v["features"][..., :1]), ValueError,
         r"x must have H >= 2 and W >= 2", ATTN_OPS),
    Case("h0", _set(x=lambda v: v["x"][:, :, :0]), ValueError, r"x must have H >= 1 and W >= 1", ("ghost_concat",)),
    Case("one-value-per-channel", _set(x=lambda v: v["x"][:1, :, :1, :1]), ValueError,
         r"x: expected more than 1 value per channel", ("ghost_concat",)),
    Case("one-pooled-value-per-channel",
         _set(x=lambda v: v["x"][:1, :, :3, :2], features=lambda v: v["features"][:1, :, :3, :2]), ValueError,
         r"more than 1 value per channel", ATTN_OPS),
    # BatchNorm modules
    Case("bn-not-a-module", _set(cheap_bn="bn"), TypeError, r"cheap_bn must be an nn.BatchNorm2d", GHOST_OPS),
    Case("bn-not-affine", _set(primary_bn=nn.BatchNorm2d(INIT, affine=False)), ValueError,
         r"primary_bn: the fused ops need an affine", GHOST_OPS),
    Case("bn-no-running-stats", _set(conv_bn=nn.BatchNorm2d(OUP, track_running_stats=False)), ValueError,
         r"conv_bn: the fused ops need", ATTN_OPS),
    Case("bn-momentum", _bn_with("primary_bn", momentum=lambda m: 1.5), ValueError,
         r"primary_bn.momentum must be in \[0, 1\]", GHOST_OPS),
    Case("bn-eps", _bn_with("vertical_bn", eps=lambda e: 0.0), ValueError, r"vertical_bn.eps must be positive",
         ATTN_OPS),
    # handled, not rejected: the eager result
    Case("x-channels_last", _set(x=lambda v: v["x"].contiguous(memory_format=torch.channels_last))),
    Case("x-strided", _set(x=lambda v: _strided(v["x"]))),
    Case("x-expanded", _set(x=lambda v: v["x"][:1, :, :1].expand(2, CIN, 6, 5))),
    Case("x-transposed", _set(x=lambda v: v["x"].transpose(2, 3).contiguous().transpose(2, 3))),
    Case("features-channels_last", _set(features=lambda v: v["features"].contiguous(memory_format=torch.channels_last)),
         ops=("dfc_attention",)),
    Case("weights-strided", _set(primary_weight=lambda v: _strided(v["primary_weight"].squeeze(-1))[..., None],
                                 cheap_weight=lambda v: _strided(v["cheap_weight"])), ops=GHOST_OPS),
    Case("dfc-weights-strided", _set(conv_weight=lambda v: _strided(v["conv_weight"].squeeze(-1))[..., None],
                                     horizontal_weight=lambda v: _strided(v["horizontal_weight"])), ops=ATTN_OPS),
    Case("bn-strided", _bn_with("cheap_bn", weight=_strided, running_var=_strided), ops=GHOST_OPS),
    Case("bn-float32-with-float16-x", _set(**{name: (lambda name: lambda v: v[name].half())(name) for name in
                                              ("x", "features", *WEIGHTS)})),
    Case("empty-batch-train", _set(x=lambda v: v["x"][:0], features=lambda v: v["features"][:0])),
    Case("empty-batch-eval", _set(x=lambda v: v["x"][:0], features=lambda v: v["features"][:0]), training=False),
    Case("empty-batch-channels_last", _set(x=lambda v: v["x"][:0].contiguous(memory_format=torch.channels_last),
                                           features=lambda v: v["features"][:0])),
    Case("h1-original", _set(x=lambda v: v["x"][:, :, :1]), ops=("ghost_concat",)),
    Case("one-value-per-channel-eval", _set(x=lambda v: v["x"][:1, :, :1, :1]), ops=("ghost_concat",),
         training=False),
]

# Errors of BatchNorm's batch statistics, which eval mode does not compute.
TRAINING_ONLY_ERRORS = ("one-value-per-channel", "one-pooled-value-per-channel")


def _eval_variants(cases):
    """The training cases again in eval mode, where a call that nothing observes goes straight to the cpu kernel,
    whose own checks stand in for the Python ones until it refuses (``ops.define.call_fused_op``): the error must
    be the same."""
    return [dataclasses.replace(case, name=f"{case.name}-eval", training=False,
                                error=None if case.name in TRAINING_ONLY_ERRORS else case.error)
            for case in cases if case.training]


def _cases(cases, operations=OPS):
    return [pytest.param(op, case, id=f"{op}-{case.name}") for case in cases for op in operations
            if op in case.ops]


def _eager_equivalent(values: dict) -> dict:
    """The same arguments as dense tensors with fresh copies of the BatchNorm state (for the eager run)."""
    out = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.contiguous().clone()
        elif isinstance(value, ops.BatchNorm):
            out[name] = ops.BatchNorm(*[t.contiguous().clone() if isinstance(t, torch.Tensor) else t for t in value])
        elif isinstance(value, nn.Module):
            out[name] = copy.deepcopy(value)
        else:
            out[name] = value
    return out


def _bn_tensors(values: dict) -> list[torch.Tensor]:
    return [t for v in values.values() if isinstance(v, (nn.BatchNorm2d, ops.BatchNorm))
            for t in (ops.BatchNorm.of(v) if isinstance(v, nn.Module) else v)[:5]]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op, case", _cases(PUBLIC_CASES + _eval_variants(PUBLIC_CASES)))
def test_public_op(backend, op, case):
    values = base_values()
    case.change(values)
    if case.error is not None:
        with pytest.raises(case.error, match=case.pattern):
            public_call(op, values, backend, case.training)
        return
    eager_values = _eager_equivalent(values)
    if not case.training:  # unobserved: the kernel at once
        with torch.no_grad():
            unobserved = public_call(op, values, backend, False)
            assert_close(unobserved, public_call(op, _eager_equivalent(values), "eager", False), unobserved.dtype,
                         "output")
    x = values["x"].requires_grad_()
    out = public_call(op, values, backend, case.training)
    expected = public_call(op, eager_values, "eager", case.training)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.is_contiguous(memory_format=ghostfused.reference.memory_format_of(x))
    assert_close(out, expected, x.dtype, "output")
    grad = torch.randn_like(expected)
    (dx,) = torch.autograd.grad(out, x, grad)
    assert dx.shape == x.shape
    for actual, wanted in zip(_bn_tensors(values), _bn_tensors(eager_values)):  # running statistics, counters
        torch.testing.assert_close(actual, wanted, rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------------
# Modules, convert, backend selection.


def test_module_bad_inputs():
    module = ghostfused.nn.GhostModuleV2(CIN, OUP, mode="attn", backend="eager")
    cases = [(torch.randn(CIN, 6, 5), ValueError, "x must be 4-D"),
             (torch.randint(0, 3, (2, CIN, 6, 5)), TypeError, "x must be float"),
             (torch.randn(2, CIN + 1, 6, 5), ValueError, "primary_weight must have shape"),
             (torch.randn(2, CIN, 6, 5, device="meta"), ValueError, "is on cpu but x is on meta"),
             (torch.randn(2, CIN, 1, 5), ValueError, "H >= 2 and W >= 2"),
             (torch.randn(2, CIN, 6, 5, dtype=torch.float64), TypeError, "must have x's dtype")]
    for x, error, message in cases:
        with pytest.raises(error, match=message):
            module(x)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (dict(backend=3), TypeError, "backend must be a string"),
    (dict(mode="fused"), ValueError, "mode must be 'original' or 'attn'"),
    (dict(mode="attn", dfc_kernel_size=4), ValueError, "dfc_kernel_size must be a positive odd number"),
    (dict(mode="attn", upsample="cubic"), ValueError, "upsample must be one of"),
])
def test_module_bad_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        ghostfused.nn.GhostModuleV2(CIN, OUP, **kwargs)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["original", "attn"])
def test_module_unusual_inputs_match_eager(backend, mode):
    """Empty batches, channels_last, non-dense and expanded inputs through a fused module: eager's result."""
    reference = ghost_module(CIN, OUP, mode=mode, dtype=torch.float64).train()
    fused = ghostfused.convert(copy.deepcopy(reference), backend=backend)
    base = torch.randn(3, CIN, 7, 6, dtype=torch.float64)
    channels_last = base.contiguous(memory_format=torch.channels_last)
    for x in (base[:0], channels_last[:0], channels_last, base[:, :, ::2], base[:1, :, :1].expand(3, CIN, 7, 6)):
        expected = reference(x)
        actual = fused(x)
        assert actual.shape == expected.shape
        assert actual.is_contiguous(memory_format=ghostfused.reference.memory_format_of(x))
        assert_close(actual, expected, torch.float64, f"input of strides {x.stride()}")
    for name, buf in fused.named_buffers():
        torch.testing.assert_close(buf, dict(reference.named_buffers())[name])


def test_convert_bad_arguments():
    model = ghost_module(CIN, OUP)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ghostfused.convert("ghostnetv2_100")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ghostfused.convert(model, backend="gpu")
    with pytest.raises(TypeError, match="backend must be a string"):
        ghostfused.convert(model, backend=None)
    unavailable = [b for b in backends.BACKENDS if b not in ghostfused.available_backends()]
    for name in unavailable:
        with pytest.raises(ghostfused.BackendUnavailableError, match=f"backend '{name}' is not available: "):
            ghostfused.convert(model, backend=name)
    assert type(model) is ghostfused.reference.GhostModuleV2  # nothing converted by the failed calls


def test_set_backend_bad_names():
    before = ghostfused.get_backend()
    for name, error, message in [("gpu", ValueError, "unknown backend 'gpu'"), ("CPU", ValueError, "unknown backend"),
                                 (None, TypeError, "backend must be a string"),
                                 (["cpu"], TypeError, "backend must be a string")]:
        with pytest.raises(error, match=message):
            ghostfused.set_backend(name)
        with pytest.raises(error, match=message):
            with ghostfused.use_backend(name):
                pass
        assert ghostfused.get_backend() == before
    for name in [b for b in backends.BACKENDS if b not in ghostfused.available_backends()]:
        with pytest.raises(ghostfused.BackendUnavailableError, match=f"backend '{name}' is not available"):
            ghostfused.set_backend(name)
        assert ghostfused.get_backend() == before


@pytest.mark.parametrize("op", OPS)
def test_public_op_unknown_backend(op):
    for backend, error, message in [("gpu", ValueError, "unknown backend 'gpu'"),
                                    (0, TypeError, "backend must be a string")]:
        with pytest.raises(error, match=message):
            public_call(op, base_values(), backend)


# ---------------------------------------------------------------------------------------------------------------
# Raw ops, in a child process.

SCHEMA_ARGUMENTS = {
    "ghost_concat": ("x", "primary_weight", "cheap_weight", "bn_weight", "bn_bias", "bn_mean", "bn_var", "bn_eps",
                     "oup", "relu", "training", "sync_group"),
    "dfc_attention": ("x", "features", "conv_weight", "horizontal_weight", "vertical_weight", "bn_weight", "bn_bias",
                      "bn_mean", "bn_var", "bn_eps", "upsample", "training", "sync_group"),
    "ghost_attn": ("x", "primary_weight", "cheap_weight", "conv_weight", "horizontal_weight", "vertical_weight",
                   "bn_weight", "bn_bias", "bn_mean", "bn_var", "bn_eps", "oup", "relu", "upsample", "training",
                   "sync_group"),
}
BN_ORDER = {"ghost_concat": ("primary_bn", "cheap_bn"), "dfc_attention": ("conv_bn", "horizontal_bn", "vertical_bn"),
            "ghost_attn": ("primary_bn", "cheap_bn", "conv_bn", "horizontal_bn", "vertical_bn")}


def schema_values(op: str, values: dict, training: bool = True) -> dict:
    """The raw op's arguments (without backend) from the public ones."""
    bns = [ops.BatchNorm.of(values[name]) for name in BN_ORDER[op]]
    raw = dict(values, bn_weight=[bn.weight.detach() for bn in bns], bn_bias=[bn.bias.detach() for bn in bns],
               bn_mean=[bn.running_mean for bn in bns], bn_var=[bn.running_var for bn in bns],
               bn_eps=[bn.eps for bn in bns], relu=True, upsample="nearest", training=training, sync_group=None)
    return {name: raw[name] for name in SCHEMA_ARGUMENTS[op]}


def _list_item(name: str, index: int, fn):
    def change(v):
        v[name] = list(v[name])
        v[name][index] = fn(v[name][index])
    return change


# Raw-op cases: (name, change of the schema arguments, regex the message must match, ops); a None regex means the
# input must work and give the eager backend's result.
RAW_CASES = [
    ("x-3d", _set(x=lambda v: v["x"][0]), r"\bx must be 4-D", OPS),
    ("x-int", _set(x=lambda v: v["x"].long()), r"\bx must be float", OPS),
    ("x-h0", _set(x=lambda v: v["x"][:, :, :0], features=lambda v: v["features"][:, :, :0]), r"\bx must have H", OPS),
    ("x-h1-attn", _set(x=lambda v: v["x"][:, :, :1], features=lambda v: v["features"][:, :, :1]),
     r"\bx must have H >= 2 and W >= 2", ATTN_OPS),
    ("x-channels", _set(x=lambda v: torch.randn(2, CIN + 1, 6, 5, device=v["x"].device)),
     r"(primary_weight|conv_weight) must have shape", OPS),
    ("x-float64", _set(x=lambda v: v["x"].double()), r"(primary_weight|conv_weight|features) must have x's dtype",
     OPS),
    ("primary_weight-no-channels", _set(primary_weight=lambda v: v["primary_weight"][:0]), r"primary_weight must",
     GHOST_OPS),
    ("cheap_weight-channels", _set(cheap_weight=lambda v: torch.randn(INIT + 1, 1, 3, 3, device=v["x"].device)),
     r"cheap_weight must have shape", GHOST_OPS),
    ("horizontal_weight-even", _set(horizontal_weight=lambda v: torch.randn(OUP, 1, 1, 4, device=v["x"].device)),
     r"horizontal_weight must have shape", ATTN_OPS),
    ("vertical_weight-kernel", _set(vertical_weight=lambda v: torch.randn(OUP, 1, 3, 1, device=v["x"].device)),
     r"vertical_weight must have shape", ATTN_OPS),
    ("features-channels", _set(features=lambda v: v["features"][:, 1:]), r"(features|conv_weight) must have shape",
     ("dfc_attention",)),
    ("oup-range", _set(oup=2 * INIT + 1), r"\boup must be in", GHOST_OPS),
    ("upsample", _set(upsample="cubic"), r"\bupsample must be", ATTN_OPS),
    ("bn_weight-length", _set(bn_weight=lambda v: v["bn_weight"][:-1]), r"\bbn_weight\b", OPS),
    ("bn_var-shape", _list_item("bn_var", 0, lambda t: t[1:]), r"\bbn_var\[0\] must have shape", OPS),
    ("bn_mean-int", _list_item("bn_mean", 1, lambda t: t.long()), r"\bbn_mean\[1\] must be", OPS),
    ("bn_eps-negative", _list_item("bn_eps", 0, lambda e: -1.0), r"\bbn_eps\[0\] must be positive", OPS),
    ("bn_bias-meta", _list_item("bn_bias", 1, lambda t: t.to("meta")), r"\bbn_bias\[1\] is on meta", OPS),
    ("x-meta", _set(x=lambda v: v["x"].to("meta")), r"is on \w+(:\d+)? but x is on meta", OPS),
    ("one-value-per-channel", _set(x=lambda v: v["x"][:1, :, :1, :1]), r"more than 1 value per channel",
     ("ghost_concat",)),
    ("x-channels_last", _set(x=lambda v: v["x"].contiguous(memory_format=torch.channels_last)), None, OPS),
    ("x-strided", _set(x=lambda v: _strided(v["x"])), None, OPS),
    ("x-expanded", _set(x=lambda v: v["x"][:1, :, :1].expand(2, CIN, 6, 5)), None, OPS),
    ("features-strided", _set(features=lambda v: _strided(v["features"])), None, ("dfc_attention",)),
    ("weights-strided", _set(cheap_weight=lambda v: _strided(v["cheap_weight"])), None, GHOST_OPS),
    ("bn_weight-strided", _list_item("bn_weight", 0, _strided), None, OPS),
    ("bn_mean-strided-eval", lambda v: (_list_item("bn_mean", 1, _strided)(v), v.update(training=False)), None, OPS),
    ("empty-batch-train", _set(x=lambda v: v["x"][:0], features=lambda v: v["features"][:0]), None, OPS),
    ("empty-batch-eval", _set(x=lambda v: v["x"][:0], features=lambda v: v["features"][:0], training=False), None,
     OPS),
    ("eval", _set(training=False), None, OPS),
]
# Backward-only cases (grad_out), and the unknown backend of torch.ops.ghostfused.
GRAD_CASES = [
    ("grad_out-channels", lambda g: g[:, 1:], r"grad_out must have shape"),
    ("grad_out-float64", lambda g: g.double(), r"grad_out must have x's dtype"),
    ("grad_out-3d", lambda g: g[0], r"grad_out must be 4-D"),
    ("grad_out-strided", _strided, None),
    ("grad_out-channels_last", lambda g: g.contiguous(memory_format=torch.channels_last), None),
]


def _raw_entries(device: str) -> list[tuple[str, str]]:
    """(namespace, backend) pairs to test on ``device``: torch.ops.ghostfused with each backend, and the kernels
    through torch.ops.ghostfused_C and through the extension's Python entry points (ghostfused._C, what the backends
    call) when the extension has kernels for the device."""
    dev = torch.device(device)
    names = [b for b in ghostfused.available_backends() if backends.supports_device(b, dev)]
    entries = [("ghostfused", b) for b in names]
    if backends.unavailable_reason("cpu" if device == "cpu" else "cuda") is None:
        entries += [("ghostfused_C", device), ("entry_points", device)]
    return entries


def _raw_cases(device: str):
    """Every raw case on ``device``: (case id, namespace, backend to call, op, direction, change, grad_change)."""
    for namespace, backend in _raw_entries(device):
        for op in OPS:
            cases = [(f"forward-{name}", "forward", change, None) for name, change, _, op_names in RAW_CASES
                     if op in op_names]
            cases += [(f"backward-{name}", "backward", None, grad_change) for name, grad_change, _ in GRAD_CASES]
            if namespace == "ghostfused":
                cases.append(("forward-unknown-backend", "forward", None, None))
            for name, direction, change, grad_change in cases:
                run_backend = "gpu" if name == "forward-unknown-backend" else backend
                yield f"{namespace}-{backend}-{op}-{name}", namespace, run_backend, op, direction, change, grad_change


def _raw_ids(device: str) -> list[str]:
    return [case[0] for case in _raw_cases(device)]


def _call_raw(namespace: str, backend: str, op: str, direction: str, args: list, grad_out=None):
    if namespace == "ghostfused":
        fn = getattr(torch.ops.ghostfused, op if direction == "forward" else f"{op}_backward")
        args = args + [backend]
    elif namespace == "entry_points":
        fn = getattr(backends.extension(), f"{op}_{direction}")
    else:
        fn = getattr(torch.ops.ghostfused_C, f"{op}_{direction}")
    return fn(*args) if direction == "forward" else fn(grad_out, NOTHING_SAVED, *args)


NOTHING_SAVED = torch.empty(0)  # the backward's `saved` argument: nothing, every backend recomputes then


def _backward_arguments(op: str, raw: dict) -> list:
    """The backward's arguments: the forward's with the statistics the eager forward normalised with."""
    _, mean, var, _ = getattr(torch.ops.ghostfused, op)(*raw.values(), "eager")
    sizes = [t.shape[0] for t in raw["bn_weight"]]
    return list(dict(raw, bn_mean=list(mean.split(sizes)), bn_var=list(var.split(sizes))).values())


def _dense_copy(value):
    if isinstance(value, torch.Tensor):
        return value.contiguous().clone()
    if isinstance(value, list):
        return [_dense_copy(v) for v in value]
    return value


def _run_raw_case(namespace, backend, op, direction, change, grad_change, device) -> tuple[str, str]:
    """Run one raw case; returns (outcome, detail): ('raised', 'Type: message') or ('returned', mismatch or '')."""
    values = base_values(device=device)
    raw = schema_values(op, values)
    if change is not None:
        change(raw)
    try:
        if direction == "forward":
            result = _call_raw(namespace, backend, op, "forward", list(raw.values()))
            expected = getattr(torch.ops.ghostfused, op)(*[_dense_copy(v) for v in raw.values()], "eager")
        else:
            args = _backward_arguments(op, raw)
            grad = torch.randn(2, OUP, 6, 5, dtype=DTYPE, device=device)
            grad_out = grad_change(grad) if grad_change is not None else grad
            result = _call_raw(namespace, backend, op, "backward", args, grad_out)
            expected = getattr(torch.ops.ghostfused, f"{op}_backward")(grad.contiguous(), NOTHING_SAVED, *args,
                                                                        "eager")
    except ALLOWED_ERRORS as error:
        return "raised", f"{type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001 - an undocumented exception type is a failure, reported by the parent
        return "wrong-exception", f"{type(error).__name__}: {error}"
    problems = []
    if direction == "forward":  # out and statistics; the fourth result (saved) is the backend's own
        result, expected = result[:3], expected[:3]
    for i, (r, e) in enumerate(zip(result, expected)):
        if r.shape != e.shape or r.dtype != e.dtype:
            problems.append(f"result {i}: {tuple(r.shape)} {r.dtype}, eager {tuple(e.shape)} {e.dtype}")
        elif not torch.allclose(r.cpu(), e.cpu(), rtol=2e-4, atol=2e-4, equal_nan=False):
            problems.append(f"result {i}: max difference {(r.cpu() - e.cpu()).abs().max().item()}")
    if direction == "forward":
        x = raw["x"]
        if not result[0].is_contiguous(memory_format=ghostfused.reference.memory_format_of(x)):
            problems.append(f"output strides {result[0].stride()} for x of strides {x.stride()}")
    return "returned", "; ".join(problems)


def child_main(device: str, after: str | None = None) -> None:
    """Entry point of the child process: runs the raw cases on ``device`` (those after case ``after``, when given),
    one JSON line each on stdout, announcing each case on stderr first so that the parent can name the case a crash
    happened in."""
    torch.manual_seed(0)
    cases = list(_raw_cases(device))
    start = [case[0] for case in cases].index(after) + 1 if after else 0
    for case_id, *call in cases[start:]:
        print(f"start {case_id}", file=sys.stderr, flush=True)
        outcome, detail = _run_raw_case(*call, device)
        print(json.dumps({"case": case_id, "outcome": outcome, "detail": detail}), flush=True)


def _expectation(case_id: str):
    """The regex the message of ``case_id`` must match, or None when the case must return eager's result."""
    name = case_id.split("-forward-", 1)[-1] if "-forward-" in case_id else case_id.split("-backward-", 1)[-1]
    if name == "unknown-backend":
        return r"unknown backend 'gpu'"
    if "-backward-" in case_id:
        return dict((n, p) for n, _, p in GRAD_CASES)[name]
    return dict((n, p) for n, _, p, _ in RAW_CASES)[name]


_child_results = {}


def _results(device: str) -> tuple[dict, subprocess.CompletedProcess]:
    """The records of every raw case on ``device`` and the last child process. A child that dies in a case (a crash)
    records that case as crashed and a new child goes on with the next one."""
    if device not in _child_results:
        results, after = {}, None
        while True:
            code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                    f"import test_bad_input_matrix as t; t.child_main({device!r}, {after!r})")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                                  env=dict(os.environ))
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    results[record["case"]] = record
            started = [line[len("start "):] for line in proc.stderr.splitlines() if line.startswith("start ")]
            if proc.returncode == 0 or not started or started[-1] in results:
                break  # done, or died outside any case (the missing cases then fail with its stderr)
            after = started[-1]
            results[after] = {"case": after, "outcome": "crashed",
                              "detail": f"exit status {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"}
        _child_results[device] = (results, proc)
    return _child_results[device]


def _check_raw(device: str, case_id: str) -> None:
    results, proc = _results(device)
    if case_id not in results:
        started = [line for line in proc.stderr.splitlines() if line.startswith("start ")]
        pytest.fail(f"the child process ended (exit status {proc.returncode}) before finishing this case; last case "
                    f"started: {started[-1] if started else None}\nstderr tail:\n{proc.stderr[-3000:]}")
    record = results[case_id]
    if record["outcome"] == "crashed":
        pytest.fail(f"{case_id} crashed the process: {record['detail']}")
    pattern = _expectation(case_id)
    kernel_case = case_id.startswith(("ghostfused_C-", "entry_points-"))
    if kernel_case and "meta" in case_id:
        # A call that mixes meta and real tensors goes to the dispatcher's Meta key, where the extension registers
        # no kernel: the dispatcher refuses it (NotImplementedError: "... with Meta tensors, but there was no fake
        # impl or Meta kernel registered").
        pattern = f"{pattern}|with Meta tensors|'Meta' backend"
    if pattern is None:
        assert record["outcome"] == "returned", f"{case_id}: {record['detail']}"
        assert record["detail"] == "", f"{case_id} differs from eager: {record['detail']}"
    elif kernel_case and case_id.endswith("x-h0"):
        # Eager convolutions refuse empty images; the C++ kernels may refuse them or return an empty output.
        assert record["outcome"] in ("raised", "returned"), f"{case_id}: {record['detail']}"
    else:
        assert record["outcome"] == "raised", f"{case_id}: returned instead of raising ({record['detail']})"
        assert re.search(pattern, record["detail"]), f"{case_id}: message {record['detail']!r} !~ {pattern!r}"


@pytest.mark.parametrize("case_id", _raw_ids("cpu"))
def test_raw_op_on_cpu(case_id):
    _check_raw("cpu", case_id)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case_id", _raw_ids("cuda") if torch.cuda.is_available() else [])
def test_raw_op_on_gpu(case_id):
    _check_raw("cuda", case_id)


# ---------------------------------------------------------------------------------------------------------------
# GPU: the public matrix on CUDA tensors, with a CPU tensor as the second device.


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("op", OPS)
def test_public_op_on_gpu(backend, op):
    for name, error, pattern in [("x", ValueError, r"is on cuda:\d+ but x is on cpu|is on cpu but x is on cuda"),
                                 ("features" if op == "dfc_attention" else "primary_weight", ValueError,
                                  r"is on cpu but x is on cuda")]:
        values = base_values(device="cuda")
        values[name] = values[name].cpu()
        with pytest.raises(error, match=pattern):
            public_call(op, values, backend)
    values = base_values(device="cuda")
    values["x"] = _strided(values["x"])
    expected = public_call(op, _eager_equivalent(values), "eager")
    assert_close(public_call(op, values, backend), expected, DTYPE, "strided x on the GPU", scale=10)
