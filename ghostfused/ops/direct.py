"""When a custom-op call may skip the dispatcher: run its Python implementation directly, or its autograd node.

Both checks run on every call, where a small kernel takes microseconds: one plain loop over the arguments each.
"""

import torch
from torch import Tensor

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _traced() -> bool:
    """A compiler, tracer, dispatch mode or functorch transform would see a custom-op call now."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active())


def plain_eager(args) -> bool:
    """Whether only autograd would see a custom op called with ``args`` (tensors, tensor lists and other values): no
    compiler or tracer, no dispatch mode, functorch transform or tensor subclass. Such a call can run the op's own
    autograd node (``ghostfused.ops.define``) without the dispatcher's round trips into Python."""
    if _traced():
        return False
    for arg in args:
        for t in (arg if isinstance(arg, list) else (arg,)):
            if isinstance(t, Tensor) and type(t) not in _PLAIN_TENSOR_TYPES:
                return False
    return True


def unobserved(args) -> bool:
    """Whether nothing would see a custom op called with ``args``: as :func:`plain_eager`, and no autograd graph to
    record (no tensor needs a gradient, or grad mode is off). Such a call can run the op's implementation directly."""
    if _traced():
        return False
    grad_enabled = torch.is_grad_enabled()
    for arg in args:
        for t in (arg if isinstance(arg, list) else (arg,)):
            if isinstance(t, Tensor) and (type(t) not in _PLAIN_TENSOR_TYPES or grad_enabled and t.requires_grad):
                return False
    return True
