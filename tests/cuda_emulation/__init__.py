"""The CUDA backend's kernels and glue built for the CPU, for tests that run them without a GPU.

``load()`` compiles ``csrc/cuda/*.cu`` as C++ against the host emulation of the CUDA runtime in ``include/`` (the
.cu files unchanged: ``GHOSTFUSED_CUDA_EMULATION`` only swaps the launch for ``emulation.cpp``'s fibers), with the
torch glue ``csrc/cuda/*_glue.cpp`` as it is, into a library that registers the glue for the ``CUDA`` dispatch key of
the ``ghostfused_C`` ops, as the CUDA build does. The main extension (a CPU build) registers nothing there, so
``call(op, *args)`` redispatches an op to that key explicitly with CPU tensors: the glue allocates with the inputs'
options, its GEMMs run on the CPU, and the kernels run in the emulation.

What this checks and what it cannot: the kernels' index maps, layouts, reductions (their fixed order, barriers and
warp shuffles), dtype conversions and the glue's sequence of launches, against the eager reference, and races between
the threads of a block as far as they make a result depend on the order the threads run in (set_reverse_order). Not
checked: memory-model effects of real concurrency, memory coalescing, speed, cuBLAS.
"""

import importlib
import pathlib

import torch
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emulation"

_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def _sources() -> list[str]:
    """The glue and emulation sources, and for each kernel file a C++ file that includes it (cpp_extension picks
    the compiler by suffix, and a .cu would go to nvcc)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    kernels = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        wrapper = BUILD / f"{cu.stem}_kernels.cpp"
        text = f'#include "{cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        kernels.append(wrapper)
    glue = sorted((ROOT / "csrc" / "cuda").glob("*glue.cpp"))
    return [str(p) for p in [*kernels, *glue, ROOT / "csrc" / "glue.cpp", ROOT / "csrc" / "cpu" / "block_cache.cpp",
                             HERE / "emulation.cpp", HERE / "self_test.cpp"]]


def load():
    """Build (once; rebuilt when a source changes) and load the emulated CUDA backend, after the main extension
    (which defines the ops)."""
    importlib.import_module("ghostfused._C")
    cpp_extension.load(
        name="ghostfused_cuda_emulation",
        sources=_sources(),
        extra_include_paths=[str(HERE / "include"), str(ROOT / "csrc" / "include")],
        extra_cflags=["-O2", "-std=c++20", "-DGHOSTFUSED_CUDA_EMULATION", "-DGHOSTFUSED_WITH_CUDA=1",
                      "-Wno-unknown-pragmas"],
        build_directory=str(BUILD),
        is_python_module=False,
        verbose=False,
    )


def call(name: str, *args):
    """``torch.ops.ghostfused_C.<name>`` (e.g. ``ghost_attn_forward``) through the emulated CUDA kernels."""
    return getattr(torch.ops.ghostfused_C, name).default.redispatch(_CUDA_KEYS, *args)
