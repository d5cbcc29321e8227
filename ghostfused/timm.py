"""``ghostfused.patch_timm()``: timm's GhostNet models come out of ``timm.create_model`` fused.

    import ghostfused, timm
    ghostfused.patch_timm()                        # or patch_timm(backend="triton")
    model = timm.create_model("ghostnetv2_100", pretrained=True)   # Ghost modules fused
    ghostfused.unpatch_timm()                      # create_model builds plain timm models again

``timm.create_model`` builds a model by calling the entrypoint its registry holds for the name
(``timm.models._registry._model_entrypoints``; ``timm.models.registry`` before timm 0.9). ``patch_timm`` replaces
the GhostNet entrypoints by ones that pass the model through :func:`ghostfused.convert` (weights, if asked for, are
loaded first; the fused modules share their tensors); ``unpatch_timm`` restores the originals. Calling the
entrypoint functions directly (``timm.models.ghostnet.ghostnetv2_100()``) is not patched.

GhostNetV1 (``ghostnet_*``: 'original' Ghost modules, ``ghost_concat``) and GhostNetV2 (``ghostnetv2_*``: 'attn'
modules for all but the first two bottlenecks) are patched. GhostNetV3's Ghost modules are re-parameterisable
multi-branch blocks that the fused ops do not compute, so its entrypoints are left alone (``convert`` would leave
those modules unfused, with a warning).
"""

import functools
import importlib
from typing import Callable, Iterable

from . import backends
from .convert import convert

GHOSTNET_MODELS = ("ghostnet_050", "ghostnet_100", "ghostnet_130", "ghostnetv2_100", "ghostnetv2_130",
                   "ghostnetv2_160")

_ORIGINAL = "__ghostfused_original__"  # attribute of a patched entrypoint: the function it wraps
_REGISTRY_MODULES = ("timm.models._registry", "timm.models.registry")


def _entrypoints() -> dict:
    """timm's registry dict, model name -> entrypoint (imports timm; its import errors propagate)."""
    for name in _REGISTRY_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name not in (name, "timm.models"):
                raise
            continue
        entrypoints = getattr(module, "_model_entrypoints", None)
        if isinstance(entrypoints, dict):
            return entrypoints
    raise ImportError(f"timm's model registry was not found (a dict _model_entrypoints in one of "
                      f"{_REGISTRY_MODULES}); is timm installed?")


def _fused_entrypoint(original: Callable, backend: str) -> Callable:
    @functools.wraps(original)
    def entrypoint(*args, **kwargs):
        return convert(original(*args, **kwargs), backend=backend)

    setattr(entrypoint, _ORIGINAL, original)
    return entrypoint


def patch_timm(backend: str = "auto", models: Iterable[str] = GHOSTNET_MODELS) -> list[str]:
    """Make ``timm.create_model(name)`` return models fused by :func:`ghostfused.convert` for each name of
    ``models`` that timm registers (default: GhostNetV1 and GhostNetV2, all widths).

    ``models``: names or one name. ``backend``: 'auto', 'eager', 'triton', 'cpu' or 'cuda', as for ``convert``.
    Patching again replaces the previous patch (another backend, other models). Returns the names patched, in the
    order given.
    """
    backend = backends.check_name(backend)
    if backend != "auto":
        backends.require(backend)
    if isinstance(models, str):
        models = [models]
    entrypoints = _entrypoints()
    patched = []
    for name in models:
        if name in entrypoints:
            original = getattr(entrypoints[name], _ORIGINAL, entrypoints[name])
            entrypoints[name] = _fused_entrypoint(original, backend)
            patched.append(name)
    return patched


def unpatch_timm() -> list[str]:
    """Undo :func:`patch_timm`: timm's original entrypoints again. Returns the names restored (none when timm was
    not patched)."""
    entrypoints = _entrypoints()
    restored = []
    for name, entrypoint in list(entrypoints.items()):
        original = getattr(entrypoint, _ORIGINAL, None)
        if original is not None:
            entrypoints[name] = original
            restored.append(name)
    return restored
