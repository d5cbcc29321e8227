"""ghostfused: fused Triton, C++ and CUDA kernels for GhostNetV2.

    import ghostfused
    model = ghostfused.convert(model)          # fuse every Ghost module in place
    ghostfused.available_backends()            # ['eager', 'cpu', ...]
    with ghostfused.use_backend("eager"): ...  # what "auto" means inside the block
"""

from . import models, nn, ops, reference
from .backends import (BackendUnavailableError, available_backends, get_backend, set_backend, use_backend)
from .convert import convert

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "available_backends", "convert", "get_backend", "models", "nn", "ops",
           "reference", "set_backend", "use_backend", "__version__"]
