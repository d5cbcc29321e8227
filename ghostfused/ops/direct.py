"""When a custom-op call may run its Python implementation directly, without the dispatcher."""

import torch
from torch import Tensor

_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def unobserved(args) -> bool:
    """Whether nothing would see a custom op called with ``args`` (tensors, tensor lists and other values): no
    autograd graph to record (no tensor needs a gradient, or grad mode is off), no compiler or tracer, no dispatch
    mode, functorch transform or tensor subclass. Such a call can run the op's implementation directly, without the
    dispatcher's round trip into Python."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0 \
            or torch._C._are_functorch_transforms_active():
        return False
    grad_enabled = torch.is_grad_enabled()
    for arg in args:  # one plain loop: this runs on every inference call, where a small kernel takes microseconds
        for t in (arg if isinstance(arg, list) else (arg,)):
            if isinstance(t, Tensor) and (type(t) not in _PLAIN_TENSOR_TYPES or grad_enabled and t.requires_grad):
                return False
    return True
