"""ghostfused: fused Triton, C++ and CUDA kernels for GhostNetV2.

    import ghostfused
    model = ghostfused.convert(model)          # fuse every Ghost module in place
    ghostfused.available_backends()            # ['eager', 'cpu', ...]
    with ghostfused.use_backend("eager"): ...  # what "auto" means inside the block
    ghostfused.patch_timm()                    # timm.create_model("ghostnetv2_100") comes out fused
"""

from . import models, nn, ops, reference
from .backends import (BackendUnavailableError, available_backends, get_backend, set_backend, use_backend)
from .convert import convert
from .timm import patch_timm, unpatch_timm

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "available_backends", "convert", "get_backend", "models", "nn", "ops",
           "patch_timm", "reference", "set_backend", "unpatch_timm", "use_backend", "__version__"]
