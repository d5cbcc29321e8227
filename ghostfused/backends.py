"""Backend registry and selection.

A backend implements every fused op's forward and backward behind the one ``ghostfused::`` schema:

=========  ==========================  ====================================================================
backend    tensors                     implementation of op ``<op>``
=========  ==========================  ====================================================================
eager      any device                  ``ghostfused.reference.<op>``; backward by autograd through it
triton     CUDA (CPU when interpreted) ``ghostfused.triton.<op>.forward`` / ``.backward``
cpu        CPU                         ``torch.ops.ghostfused_C.<op>_forward`` / ``_backward`` (C++ extension)
cuda       CUDA                        the same ``ghostfused_C`` ops, CUDA dispatch key (extension built with CUDA)
=========  ==========================  ====================================================================

The ``cpu`` and ``cuda`` backends call those kernels through the extension's Python entry points
(``ghostfused._C.<op>_forward`` / ``_backward``: the dispatcher's call below autograd, without boxing the arguments).

``"auto"`` resolves to the process default (``set_backend``, ``use_backend``, the ``GHOSTFUSED_BACKEND``
variable) or, when that is ``"auto"`` too, to the first available backend for the tensor's device:
``cuda`` then ``triton`` for CUDA tensors, ``cpu`` for CPU tensors, and ``eager`` otherwise.
"""

import contextlib
import functools
import importlib
import os
from typing import Callable, Iterator, NamedTuple

import torch

BACKENDS = ("eager", "triton", "cpu", "cuda")
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}

_BUILD_HINT = ("build it with `make test` (or `pip install -e . --no-build-isolation`) in the ghostfused checkout")


POISON_OUTPUTS = os.environ.get("GHOSTFUSED_POISON_OUTPUTS", "0") == "1"


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None,
          memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An uninitialised output for a kernel to fill: NaN-filled when GHOSTFUSED_POISON_OUTPUTS=1 (the tests set
    it), so an element a kernel forgets to write fails the comparison with the reference."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


# The ops each backend has kernels for. A backend runs any other op (the bottleneck's depthwise_bn on GPUs, where
# cuDNN's depthwise convolution is fast) through the eager reference.
GHOST_OPS = ("ghost_concat", "dfc_attention", "ghost_attn")
KERNEL_OPS = {"eager": GHOST_OPS + ("depthwise_bn",), "triton": GHOST_OPS, "cpu": GHOST_OPS + ("depthwise_bn",),
              "cuda": GHOST_OPS}

# Backends whose kernels are C++ (the extension's entry points) and validate their own arguments (TORCH_CHECK).
CPP_BACKENDS = ("cpu", "cuda")

# Backends whose forward returns the primary convolution's output in training, for their backward to read instead of
# recomputing it (see ghostfused.ops.define).
SAVES_PRIMARY = ("cpu",)


class Implementation(NamedTuple):
    """One backend's forward and backward of one op, with the arguments of ``ghostfused::<op>`` (no backend):
    ``forward(*args) -> (out, stats_mean, stats_var, saved)``, ``backward(grad_out, saved, *args)``."""

    forward: Callable
    backward: Callable


@functools.cache
def extension():
    """The compiled extension ``ghostfused._C``, or None when it is not built."""
    try:
        return importlib.import_module("ghostfused._C")
    except ImportError:
        return None


@functools.cache
def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run in this process, or None when it can."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS} or 'auto'")
    if name == "eager":
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _triton_interpreted():
            return "no GPU is available (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
        return None
    ext = extension()
    if ext is None:
        return f"the C++ extension ghostfused._C is not built: {_BUILD_HINT}"
    if name == "cuda":
        if not ext.built_with_cuda():
            return "the C++ extension was built without CUDA (a CPU build of torch, or GHOSTFUSED_BUILD_CUDA=0)"
        if not torch.cuda.is_available():
            return "no GPU is available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ghostfused_C::ghost_attn_forward", name.upper()):
        return f"the C++ extension has no {name} kernels: re{_BUILD_HINT}"
    return None


def available_backends() -> list[str]:
    """The backends that can run in this process, in the order of ``BACKENDS``."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def supports_device(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` runs on tensors of ``device``."""
    if name == "eager":
        return True
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpreted())
    return device.type == name


def check_name(name) -> str:
    """``name`` if it is a backend name or "auto"; TypeError or ValueError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS} or 'auto'")
    return name


def require(name: str) -> str:
    """``name`` if backend ``name`` can run here; BackendUnavailableError saying why otherwise."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return name


# The process-wide default behind "auto". A plain global, so that torch.compile guards on it and recompiles when
# it changes.
_default = check_name(os.environ.get("GHOSTFUSED_BACKEND", "auto"))


def get_backend() -> str:
    """The process default that ``"auto"`` stands for (itself ``"auto"`` unless set)."""
    return _default


def set_backend(name: str) -> None:
    """Set the process default used wherever ``"auto"`` is given; raises if ``name`` cannot run here."""
    global _default
    _default = name if check_name(name) == "auto" else require(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ``"auto"`` means backend ``name`` (process-wide, like ``set_backend``)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend that runs for tensors on ``device`` when ``name`` is asked for."""
    name = _default if name == "auto" else name
    if torch.compiler.is_compiling():
        return _resolve_constant(name, device.type)
    return _resolve_cached(name, device.type)


def _resolve(name: str, device_type: str) -> str:
    if check_name(name) == "auto":
        for candidate in AUTO_ORDER.get(device_type, ()):
            if unavailable_reason(candidate) is None:
                return candidate
        return "eager"
    require(name)
    if not supports_device(name, torch.device(device_type)):
        raise ValueError(f"backend {name!r} cannot run on {device_type} tensors")
    return name


# Availability does not change within a process, so torch.compile may treat the answer as a constant (outside
# compilation the wrapper would only cost time).
_resolve_constant = torch.compiler.assume_constant_result(_resolve)
# The same answer remembered (a failed resolution raises again): resolve() runs on every fused call.
_resolve_cached = functools.cache(_resolve)


def eval_kernel(name: str, device_type: str, op: str) -> Callable | None:
    """The C++ forward of op ``op`` that backend ``name`` (or "auto") runs on ``device_type`` tensors, or None when
    that backend has no C++ kernel for it or cannot run there (the caller takes the op's way, which raises). For
    callers that have already ruled out torch.compile (``resolve`` asks again)."""
    if not isinstance(name, str):  # the op's way raises its TypeError
        return None
    return _eval_kernel(_default if name == "auto" else name, device_type, op)


# A failed resolution is remembered as None (availability does not change within a process): the op's way raises.
@functools.cache
def _eval_kernel(name: str, device_type: str, op: str) -> Callable | None:
    try:
        resolved = _resolve_cached(name, device_type)
    except (TypeError, ValueError, BackendUnavailableError):
        return None
    if resolved not in CPP_BACKENDS or op not in KERNEL_OPS[resolved]:
        return None
    return implementation(resolved, op).forward


@functools.cache
def implementation(name: str, op: str) -> Implementation:
    """Backend ``name``'s forward and backward of op ``op``."""
    require(name)
    if op not in KERNEL_OPS[name]:
        return implementation("eager", op)
    if name == "eager":
        reference = importlib.import_module("ghostfused.reference")
        forward = getattr(reference, op)
        return _saving_nothing(forward, functools.partial(_autograd_backward, forward))
    if name == "triton":
        module = importlib.import_module(f"ghostfused.triton.{op}")
        return _saving_nothing(module.forward, module.backward)
    ext = extension()
    return Implementation(getattr(ext, f"{op}_forward"), getattr(ext, f"{op}_backward"))


def _saving_nothing(forward: Callable, backward: Callable) -> Implementation:
    """The implementation of a backend that recomputes what its backward needs: an empty ``saved``."""

    def forward_saving_nothing(*args):
        out, stats_mean, stats_var = forward(*args)
        return out, stats_mean, stats_var, stats_mean.new_empty((0,))

    return Implementation(forward_saving_nothing, lambda grad_out, saved, *args: backward(grad_out, *args))


# The dispatch keys autograd records through. A custom op's implementation without an autograd formula of its own
# (the backward ops), and any op a dispatch mode such as FlopCounterMode runs, is called with them excluded.
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                  torch._C.DispatchKey.AutogradNestedTensor, torch._C.DispatchKey.ADInplaceOrView)


@contextlib.contextmanager
def _recording_autograd() -> Iterator[None]:
    """Within the block, autograd records (grad mode on, its dispatch keys not excluded), and the saved-tensor hooks
    of whoever called are not applied to the graph recorded here: it never leaves the block."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    # Where hooks are disabled (functorch transforms), none can be active and none may be pushed.
    shield = torch.autograd.graph.saved_tensors_hooks(_identity, _identity) \
        if torch._C._autograd._saved_tensors_hooks_is_enabled() else contextlib.nullcontext()
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad(), shield:
        yield


def _identity(t):
    return t


def _autograd_backward(forward: Callable, grad_out: torch.Tensor, *args):
    """Backward of the eager backend: autograd through the reference forward, recomputed from detached copies of
    its differentiable arguments (x, the weights, ``bn_weight`` and ``bn_bias``).

    Plain autograd (not ``torch.func.vjp``) so that it runs wherever the backward does: below the custom op's
    dispatch, under a dispatch mode (FlopCounterMode), with saved-tensor hooks active. ``args`` are the forward's
    arguments (with the saved statistics in place of the running ones). Returns the gradients of its top-level tensor
    arguments, then those of ``bn_weight`` and ``bn_bias`` (the first two tensor lists), each packed into one tensor
    like the forward's statistics.
    """
    tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    weight_at, bias_at = [i for i, a in enumerate(args) if isinstance(a, (list, tuple)) and a and
                          isinstance(a[0], torch.Tensor)][:2]
    with _recording_autograd():
        call = [a.detach().requires_grad_() if i in tensor_at else a for i, a in enumerate(args)]
        call[weight_at] = [t.detach().requires_grad_() for t in args[weight_at]]
        call[bias_at] = [t.detach().requires_grad_() for t in args[bias_at]]
        inputs = [call[i] for i in tensor_at] + call[weight_at] + call[bias_at]
        grads = torch.autograd.grad(forward(*call)[0], inputs, grad_out, allow_unused=True, materialize_grads=True)
    grad_tensors = grads[:len(tensor_at)]
    grad_bn_weight = grads[len(tensor_at):len(tensor_at) + len(args[weight_at])]
    grad_bn_bias = grads[len(tensor_at) + len(args[weight_at]):]
    stats_dtype = torch.float64 if args[0].dtype == torch.float64 else torch.float32
    return (*grad_tensors, torch.cat([g.to(stats_dtype) for g in grad_bn_weight]),
            torch.cat([g.to(stats_dtype) for g in grad_bn_bias]))
