"""Builds the C++ extension ``ghostfused._C``.

A CUDAExtension when torch is a CUDA build and nvcc is found, a CppExtension otherwise;
GHOSTFUSED_BUILD_CUDA=0/1 forces either. TORCH_CUDA_ARCH_LIST is honoured by torch's build helpers.
The CPU kernels target x86-64-v4 (AVX-512) on x86-64 CPUs that have it, else x86-64-v3 (AVX2, FMA) where the CPU has
that; GHOSTFUSED_CPU_ARCH overrides the -march value ("native", "x86-64-v3", ...; empty for the compiler's default).
"""

import glob
import os
import platform
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    forced = os.environ.get("GHOSTFUSED_BUILD_CUDA")
    if forced is not None:
        if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            raise RuntimeError("GHOSTFUSED_BUILD_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None and shutil.which("nvcc") is not None


def host_cpu_flags() -> set[str]:
    # The extension is always built on the machine that runs it; never emit instructions its CPU lacks.
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line.split() for line in cpuinfo if line.startswith("flags")), []))
    except OSError:
        return set()


def default_cpu_arch() -> str:
    """x86-64-v4 (AVX-512) where the CPU has it: the kernels' elementwise loops (sigmoid, depthwise taps, BatchNorm)
    run 16 floats a vector, as ATen's own AVX-512 kernels do on such CPUs; else x86-64-v3 (AVX2, FMA); else the
    compiler's default."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ""
    flags = host_cpu_flags()
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "x86-64-v4"
    return "x86-64-v3" if {"avx2", "fma"} <= flags else ""


def cpu_arch_flags() -> list[str]:
    arch = os.environ.get("GHOSTFUSED_CPU_ARCH", default_cpu_arch())
    return [f"-march={arch}"] if arch else []


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    with_cuda = build_cuda()
    files = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    # No -ffast-math: results stay IEEE; -fno-trapping-math lets loops with float selects (ReLU, clamps) vectorise.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *cpu_arch_flags()]
    kwargs = dict(
        name="ghostfused._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=[("GHOSTFUSED_WITH_CUDA", "1" if with_cuda else "0")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return CppExtension(sources=files, extra_compile_args={"cxx": cxx}, **kwargs)
    files += sources("csrc/cuda/*.cu") + sources("csrc/cuda/*_glue.cpp")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(sources=files, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
