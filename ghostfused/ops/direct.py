"""When a custom-op call may run its Python implementation directly, without the dispatcher."""

import torch
from torch import Tensor


def unobserved(args) -> bool:
    """Whether nothing would see a custom op called with ``args`` (tensors, tensor lists and other values): no
    autograd graph to record (no tensor needs a gradient, or grad mode is off), no compiler or tracer, no dispatch
    mode, functorch transform or tensor subclass. Such a call can run the op's implementation directly, without the
    dispatcher's round trip into Python."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0 \
            or torch._C._are_functorch_transforms_active():
        return False
    tensors = [t for a in args for t in (a if isinstance(a, list) else (a,)) if isinstance(t, Tensor)]
    if any(type(t) is not Tensor and type(t) is not torch.nn.Parameter for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
