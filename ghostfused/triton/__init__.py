"""The ``triton`` backend: Triton kernels for the three fused ops (``ghostfused.triton.<op>.forward / backward``).

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, for tests). The shared
kernels live in :mod:`.stages` (and helpers in :mod:`.common`); each op module maps its schema's arguments onto
them and documents its launches and full-resolution memory passes.
"""
