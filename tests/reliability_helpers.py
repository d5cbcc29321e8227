"""Helpers of the reliability tests (fuzz, bad input, determinism, leaks, numerics, threads)."""

import os

import torch

from ghostfused import backends

from helpers import TOLERANCES, cpu_backends

LAYOUTS = ("contiguous", "channels_last", "strided")


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs in an interpreter on CPU (Triton without a GPU): correct but about 5 ms a program, so
    its tests use tiny shapes and few examples."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def native_cpu_backends() -> list[str]:
    """The CPU-runnable backends that run at native speed (whole-model loops are too slow for an interpreter)."""
    return [b for b in cpu_backends() if not interpreted(b)]


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values laid out as ``layout``: dense NCHW, channels_last, or a non-dense view (every other row of a
    tensor twice as tall)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        n, c, h, w = x.shape
        tall = torch.empty(n, c, 2 * h, w, dtype=x.dtype, device=x.device)
        tall[:, :, ::2] = x
        return tall[:, :, ::2]
    return x.contiguous()


def assert_close_to_truth(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str,
                          eager: torch.Tensor | None = None):
    """``actual`` (computed in ``dtype``) against ``truth`` (eager PyTorch in float64 on the same values).

    float64 is compared element by element with the float64 tolerance. A lower precision is compared with the dtype's
    tolerance relative to the tensor's largest magnitude, widened by ten times the largest error of eager PyTorch in
    that dtype (``eager``): a reduction whose result is much smaller than its terms (BatchNorm statistics, the gradient
    of a weight that a training-mode BatchNorm makes nearly scale-invariant) carries rounding errors of the size of
    its terms, in eager PyTorch as in any other summation order.
    """
    rtol, atol = TOLERANCES[dtype]
    if dtype != torch.float64 and truth.numel():
        atol = atol * max(1.0, truth.abs().max().item())
        if eager is not None:
            atol += 10 * (eager.to(truth.dtype) - truth).abs().max().item()
    torch.testing.assert_close(actual.to(truth.dtype), truth, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def statm_rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def backend_devices() -> list[tuple[str, str]]:
    """(backend, device) pairs that run here: every CPU-runnable backend on "cpu", every CUDA one on "cuda"."""
    pairs = [(b, "cpu") for b in cpu_backends()]
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in backends.BACKENDS
                  if b in backends.available_backends() and backends.supports_device(b, torch.device("cuda"))]
    return pairs
