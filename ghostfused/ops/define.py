"""How every fused op is registered: one forward op, one backward op, one autograd formula.

All fused ops share a calling convention, so the registration is written once here:

* arguments: the differentiable tensors first (``x``, weights, ...), then ``Tensor[] bn_weight, Tensor[] bn_bias,
  Tensor[] bn_mean, Tensor[] bn_var, float[] bn_eps`` (one entry per BatchNorm), then the op's flags (``bool
  training`` among them), then ``str? sync_group`` (the ``torch.distributed`` process group whose whole batch the
  BatchNorms normalise over in training, see ``ghostfused.distributed``; None: the local batch), then ``str backend``
  (a concrete backend name, resolved by the caller);
* ``ghostfused::<op>(...) -> (Tensor out, Tensor stats_mean, Tensor stats_var, Tensor saved)`` returns the output,
  the packed statistics the BatchNorms normalised with (see ``ghostfused.reference``) and what the backend's backward
  reads instead of recomputing it: the primary convolution's output y1 (flat, in the stats dtype, which is the
  ``cpu`` kernels' compute dtype) for a backend of ``backends.SAVES_PRIMARY`` in training, else an empty tensor;
* ``ghostfused::<op>_backward(Tensor grad_out, Tensor saved, ...same arguments, with the saved statistics as
  bn_mean / bn_var...) -> (one gradient per leading tensor, Tensor grad_bn_weight, Tensor grad_bn_bias)``, the
  BatchNorm gradients packed like the statistics.

Both dispatch to ``backends.implementation(backend, op)``. The backward is an op of its own so that
``torch.compile`` traces it as one opaque node too. Both validate their arguments (SPEC section 5) before a kernel
sees them, so that a direct call of ``torch.ops.ghostfused.<op>`` raises as the public function does: the Python
checks of the op for the backends written in Python, the C++ kernels' own checks (TORCH_CHECK) for ``cpu`` and
``cuda``; the fake kernels check that all tensors share one device (the dispatcher sends a call that mixes meta and
real tensors to them). The public op functions call the forward op through :func:`call_fused_op`: in eval mode
the C++ kernel at once, before any Python check, where nothing observes the call (:func:`eval_kernel_output`, the
fused modules' way to a kernel too), else :func:`run_fused_op`, which computes the eager reference instead while a
model is exported to ONNX, and takes shorter ways for a plain eager call (the implementation directly for
inference, the op's own autograd node for training).
"""

from typing import Callable

import torch
from torch import Tensor

from .. import backends
from . import checks
from .autocast import cast_for_autocast
from .batch_norm import (BatchNorm, as_batch_norm, is_fusable, module_schema_lists, schema_lists, sync_group_name,
                         training_counts, update_running_stats)
from .direct import in_onnx_export, kernel_call_allowed, plain_eager, unobserved
from ..reference import memory_format_of, stats_dtype

_OP_NAMES = {}  # forward op -> op name, for run_fused_op
_CHECKS = {}  # forward op -> its check_arguments, for call_fused_op
_FORWARDS = {}  # forward op -> its Python implementation, for run_fused_op
_NODES = {}  # forward op -> (number of leading tensors, its autograd.Function), for run_fused_op


def _check_devices(names, args) -> None:
    """Every tensor of ``args`` (named ``names``; tensor lists included) is on the device of ``x``."""
    x = args[names.index("x")]
    for name, value in zip(names, args):
        tensors = [(f"{name}[{i}]", t) for i, t in enumerate(value)] if isinstance(value, (list, tuple)) else \
            [(name, value)]
        for full, t in tensors:
            if isinstance(t, Tensor) and t.device != x.device:
                raise ValueError(f"{full} is on {t.device} but x is on {x.device}: all tensors must share one device")


def define_fused_op(name: str, arguments: str, num_tensors: int, fake_output: Callable, check_arguments: Callable):
    """Register ``ghostfused::<name>`` and ``ghostfused::<name>_backward`` with fake kernels and autograd.

    arguments: the schema's arguments without ``backend``; num_tensors: how many leading tensors are
    differentiable; fake_output(*args without backend) -> (out, stats_channels, primary_numel) gives the output's
    fake tensor, the length of the packed statistics and the size of the primary convolution's output (0 without
    one); check_arguments(*args without backend) validates them (ValueError / TypeError naming the argument) and
    returns the output's shape. Returns the forward op.
    """
    names = [argument.split()[-1] for argument in arguments.split(",")]

    def forward(*args):
        *args, backend = args
        if backend not in backends.CPP_BACKENDS:
            check_arguments(*args)
        out, stats_mean, stats_var, saved = backends.implementation(backend, name).forward(*args)
        # A view output (the eager reference's channel slice when oup == init + new) would forbid in-place updates
        # of the result, such as timm's `x += shortcut`: autograd protects a custom op's views.
        return (out.clone() if out._base is not None else out), stats_mean, stats_var, saved

    def backward(grad_out, saved, *args):
        *args, backend = args
        if backend not in backends.CPP_BACKENDS:
            checks.check_grad_out(grad_out, args[0], check_arguments(*args))
        grad_out = grad_out.contiguous(memory_format=memory_format_of(args[0]))
        return backends.implementation(backend, name).backward(grad_out, saved, *args)

    forward_op = torch.library.custom_op(
        f"ghostfused::{name}", forward, mutates_args=(),
        schema=f"({arguments}, str backend) -> (Tensor, Tensor, Tensor, Tensor)")
    backward_op = torch.library.custom_op(
        f"ghostfused::{name}_backward", backward, mutates_args=(),
        schema=f"(Tensor grad_out, Tensor saved, {arguments}, str backend) -> "
               f"({', '.join(['Tensor'] * (num_tensors + 2))})")

    @forward_op.register_fake
    def _(*args):
        _check_devices(names, args)
        out, channels, primary_numel = fake_output(*args[:-1])
        stats = args[0].new_empty((channels,), dtype=stats_dtype(args[0]))
        training = args[names.index("training")]
        saved = primary_numel if training and args[-1] in backends.SAVES_PRIMARY else 0
        return out, stats, torch.empty_like(stats), args[0].new_empty((saved,), dtype=stats_dtype(args[0]))

    @backward_op.register_fake
    def _(grad_out, saved, *args):
        _check_devices(["grad_out"] + names, (grad_out, *args))
        tensors = [torch.empty_like(t) for t in args[:num_tensors]]
        channels = sum(w.shape[0] for w in args[num_tensors])
        grad_bn = args[0].new_empty((channels,), dtype=stats_dtype(args[0]))
        return (*tensors, grad_bn, torch.empty_like(grad_bn))

    def setup_context(ctx, inputs, output):
        _, stats_mean, stats_var, saved = output
        ctx.mark_non_differentiable(stats_mean, stats_var, saved)
        bn_weight, bn_bias = inputs[num_tensors], inputs[num_tensors + 1]
        ctx.num_bn = len(bn_weight)
        ctx.flags = inputs[num_tensors + 4:]  # bn_eps, the op's flags, backend
        ctx.save_for_backward(*inputs[:num_tensors], *bn_weight, *bn_bias, stats_mean, stats_var, saved)

    def gradients(ctx, grad_out, run_backward):
        """(gradients of the leading tensors, of bn_weight, of bn_bias) from ``run_backward`` (the backward op or
        its implementation) with what ``setup_context`` saved."""
        unpacked = ctx.saved_tensors  # once: activation checkpointing's hooks allow one unpacking
        tensors = unpacked[:num_tensors]
        bn_weight = list(unpacked[num_tensors:num_tensors + ctx.num_bn])
        bn_bias = list(unpacked[num_tensors + ctx.num_bn:num_tensors + 2 * ctx.num_bn])
        stats_mean, stats_var, saved = unpacked[-3:]
        sizes = [w.shape[0] for w in bn_weight]
        grads = run_backward(grad_out, saved, *tensors, bn_weight, bn_bias, list(stats_mean.split(sizes)),
                             list(stats_var.split(sizes)), *ctx.flags)
        grad_bn_weight = [g.to(w.dtype) for g, w in zip(grads[-2].split(sizes), bn_weight)]
        grad_bn_bias = [g.to(b.dtype) for g, b in zip(grads[-1].split(sizes), bn_bias)]
        return grads[:num_tensors], grad_bn_weight, grad_bn_bias

    def autograd_backward(ctx, grad_out, _grad_mean, _grad_var, _grad_saved):
        grads, grad_bn_weight, grad_bn_bias = gradients(ctx, grad_out, backward_op)
        no_grad = [None] * ctx.num_bn  # tensor-list inputs (bn_mean, bn_var) take lists
        return (*grads, grad_bn_weight, grad_bn_bias, no_grad, no_grad, *([None] * len(ctx.flags)))

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)

    def node_forward(ctx, num_bn, *flat):
        split = num_tensors + 2 * num_bn
        args = (*flat[:num_tensors], list(flat[num_tensors:num_tensors + num_bn]),
                list(flat[num_tensors + num_bn:split]), *flat[split:])
        outputs = forward(*args)
        setup_context(ctx, args, outputs)
        return outputs

    @torch.autograd.function.once_differentiable
    def node_backward(ctx, grad_out, _grad_mean, _grad_var, _grad_saved):
        grads, grad_bn_weight, grad_bn_bias = gradients(ctx, grad_out, backward)
        return None, *grads, *grad_bn_weight, *grad_bn_bias, None, None, *([None] * len(ctx.flags))

    # The op's autograd node for plain eager calls (run_fused_op): the custom op's autograd formula with the forward
    # and backward implementations called directly, without the custom op's dispatcher round trips and argument
    # flattening (they cost more than a small kernel). Arguments: the number of BatchNorms, the leading tensors,
    # bn_weight and bn_bias unpacked (autograd tracks top-level tensors only), then the schema's other arguments.
    # Named after the op (its grad_fn: GhostAttnBackward).
    node = type("".join(part.title() for part in name.split("_")), (torch.autograd.Function,),
                {"forward": staticmethod(node_forward), "backward": staticmethod(node_backward)})

    _OP_NAMES[forward_op] = name
    _CHECKS[forward_op] = check_arguments
    _FORWARDS[forward_op] = forward
    _NODES[forward_op] = (num_tensors, node)
    return forward_op


def run_fused_op(op, *args):
    """``op(*args)``: a forward op made by :func:`define_fused_op`, with its schema's arguments (backend last).

    While a model is exported to ONNX (either exporter), the op's eager reference runs instead, without the custom
    op, so that the exported graph holds standard ONNX operators (Conv, BatchNormalization, Relu, Concat, Slice,
    AveragePool, Sigmoid, Resize, Mul) that any ONNX runtime executes. Returns ``(out, stats_mean, stats_var,
    saved)``.
    """
    if in_onnx_export():
        return backends.implementation("eager", _OP_NAMES[op]).forward(*args[:-1])
    if unobserved(args):  # inference: no dispatcher round trip
        return _FORWARDS[op](*args)
    if plain_eager(args):  # eager training: the op's own autograd node
        num_tensors, node = _NODES[op]
        bn_weight, bn_bias = args[num_tensors], args[num_tensors + 1]
        return node.apply(len(bn_weight), *args[:num_tensors], *bn_weight, *bn_bias, *args[num_tensors + 2:])
    return op(*args)


def call_fused_op(op, tensors, batch_norms, bn_names, flags, training: bool, backend: str,
                  counts: Callable[[Tensor], list]) -> Tensor:
    """A public op function's call of forward op ``op`` (made by :func:`define_fused_op`).

    tensors: the schema's leading tensors (x first) as the caller passed them (cast here under autocast);
    batch_norms: its BatchNorm arguments (modules or ``BatchNorm`` states), named ``bn_names`` in messages; flags: the
    schema's arguments between ``bn_eps`` and ``training``; counts(x): values per channel of each BatchNorm in this
    process's batch of x (for the running updates). Validates everything (SPEC section 5), updates the running
    statistics in training and returns the output.

    In eval mode a call that nothing observes goes straight to a C++ kernel (:func:`_eval_kernel_call`) before any
    Python check: at batch 1 those cost more than the kernel.
    """
    if not training:
        out = _eval_kernel_call(op, tensors, batch_norms, bn_names, flags, backend)
        if out is not None:
            return out
    checks.check_input(tensors[0])
    tensors = cast_for_autocast(*tensors)
    x = tensors[0]
    bns = [as_batch_norm(bn, name) for bn, name in zip(batch_norms, bn_names)]
    lists = schema_lists(bns)
    group = sync_group_name(batch_norms, bn_names) if training else None
    _CHECKS[op](*tensors, *lists, *flags, training, group, bn_names=bn_names)
    _check_momenta(bns, bn_names)
    counts = training_counts(counts(x), group, x.device) if training else None
    out, stats_mean, stats_var, _ = run_fused_op(op, *tensors, *lists, *flags, bool(training), group,
                                                 backends.resolve(backend, x.device))
    if training:
        update_running_stats(bns, stats_mean, stats_var, counts)
    return out


def _eval_kernel_call(op, tensors, batch_norms, bn_names, flags, backend: str) -> Tensor | None:
    """An eval-mode public op call computed at once by ``backend``'s C++ kernel (:func:`eval_kernel_output`), or
    None when it must take the checked way. The kernel runs only where nothing observes the call and autocast is off
    on x's device (so there is nothing to cast), and its own checks (TORCH_CHECK) stand in for the Python ones; should
    it refuse the arguments, the Python checks run then, so the error is the one they raise (ValueError / TypeError
    naming the argument) wherever they find the fault. BatchNorm modules are read through their dicts; one that the
    fused ops do not reproduce (``is_fusable``), or anything else, takes the checked way, which names the fault."""
    if all(map(is_fusable, batch_norms)):
        lists = module_schema_lists(batch_norms)
    elif all(type(bn) is BatchNorm for bn in batch_norms):
        lists = schema_lists(batch_norms)
    else:
        return None
    args = (*tensors, *lists, *flags, False, None)
    out = eval_kernel_output(_OP_NAMES[op], backend, args, diagnose=lambda: _CHECKS[op](*args, bn_names=bn_names))
    if out is not None:
        _check_momenta(batch_norms, bn_names)
    return out


def _check_momenta(bns, bn_names) -> None:
    for bn, name in zip(bns, bn_names):
        checks.check_momentum(bn, name)


def eval_kernel_output(name: str, backend: str, args, diagnose: Callable | None = None) -> Tensor | None:
    """The output of an eval-mode call of op ``name`` computed by ``backend``'s C++ kernel at once, or None when
    the call must take the public op function's way.

    For the fused modules (``ghostfused.nn``), whose layers were checked when the module was built, and the public
    op functions (:func:`call_fused_op`). ``args``: the op's schema arguments without ``backend``, with ``training``
    False and no sync group. The public functions' Python checks and the dispatcher round trip cost more than the
    kernel on the small inputs of batch-1 inference (``benchmarks/cpu_ops.py --overhead``); the C++ kernels check
    every argument themselves (TORCH_CHECK: ranks, shapes, dtypes, devices, with messages naming the argument), so a
    call that nothing observes (:func:`unobserved`), outside autocast (the public function casts) and ONNX export
    (the reference runs), skips nothing by going straight to the kernel. When the kernel refuses the arguments,
    ``diagnose()`` runs before its error propagates (the public functions' Python checks, which raise their own).
    Backends without C++ kernels, or without one for this op, return None.
    """
    x = args[0]
    if not isinstance(x, Tensor):
        return None
    if not kernel_call_allowed(args):  # first: under torch.compile nothing after it runs
        return None
    forward = backends.eval_kernel(backend, "cpu" if x.is_cpu else x.device.type, name)  # is_cpu: no device object
    if forward is None:
        return None
    try:
        return forward(*args)[0]
    except (RuntimeError, TypeError, ValueError):
        if diagnose is not None:
            diagnose()
        raise
