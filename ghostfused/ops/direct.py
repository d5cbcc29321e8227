"""When a custom-op call may skip the dispatcher: run its Python implementation directly, its autograd node, or (in
eval mode) a backend's C++ kernel at once.

The checks run on every call, where a small kernel takes microseconds: the arguments are flattened once and their
types and ``requires_grad`` flags read by C-level iteration (``map``), not a Python loop per tensor; before a C++
kernel the extension reads them (:func:`kernel_call_allowed`).
"""

import functools
import operator
from typing import Callable

import torch
from torch import Tensor

from .. import backends

# Argument types of a call that only autograd can see: plain tensors and the schemas' other values. Anything else
# (a tensor subclass, a SymInt) sends the call through the dispatcher.
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter, bool, int, float, str, type(None)))
_requires_grad = operator.attrgetter("requires_grad")


try:  # the flags torch.onnx.is_in_onnx_export reads, bound once: it imports both modules at every call
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _onnx_globals

    def in_onnx_export() -> bool:
        """Whether a model is being exported to ONNX (either exporter): ``torch.onnx.is_in_onnx_export()``. Under
        torch.compile the public function itself, which dynamo evaluates (it refuses to trace into the flags'
        property)."""
        if torch.compiler.is_compiling():
            return torch.onnx.is_in_onnx_export()
        return _onnx_globals.in_onnx_export or _onnx_flags._is_onnx_exporting
except ImportError:  # another torch layout: the public function
    in_onnx_export = torch.onnx.is_in_onnx_export


def _traced() -> bool:
    """A compiler, tracer, dispatch mode or functorch transform would see a custom-op call now."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active())


def _flat(args) -> list:
    """``args`` with its lists (tensor lists, float lists) spliced in."""
    flat = []
    for arg in args:
        if type(arg) is list:
            flat += arg
        else:
            flat.append(arg)
    return flat


def plain_eager(args) -> bool:
    """Whether only autograd would see a custom op called with ``args`` (tensors, tensor lists and other values): no
    compiler or tracer, no dispatch mode, functorch transform or tensor subclass. Such a call can run the op's own
    autograd node (``ghostfused.ops.define``) without the dispatcher's round trips into Python."""
    return not _traced() and _PLAIN_TYPES.issuperset(map(type, _flat(args)))


def unobserved(args) -> bool:
    """Whether nothing would see a custom op called with ``args``: as :func:`plain_eager`, and no autograd graph to
    record (no tensor needs a gradient, or grad mode is off). Such a call can run the op's implementation directly."""
    if _traced():
        return False
    flat = _flat(args)
    if not _PLAIN_TYPES.issuperset(map(type, flat)):
        return False
    return not torch.is_grad_enabled() or not any(map(_requires_grad, (t for t in flat if isinstance(t, Tensor))))


def kernel_call_allowed(args) -> bool:
    """Whether a module may call a C++ kernel with ``args`` (the op's schema arguments, x first) straight away,
    skipping the op: nothing observes the call (:func:`unobserved`), autocast is off on x's device (the public
    functions cast) and no ONNX export runs (the reference does). The Python state first (under torch.compile nothing
    after it runs), then the rest in one call of the extension (``ghostfused._C.unobserved_kernel_call``): on the
    fused layers' eval path the checks cost more than a small kernel as a dozen Python calls, the more so after other
    layers have pushed the interpreter's data out of the caches. False without the extension."""
    if torch.compiler.is_compiling() or in_onnx_export():
        return False
    check = _unobserved_kernel_call()
    return check is not None and check(args)


@functools.cache
def _unobserved_kernel_call() -> Callable | None:
    ext = backends.extension()
    return None if ext is None else ext.unobserved_kernel_call
