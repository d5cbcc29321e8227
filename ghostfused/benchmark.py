"""Model-level benchmark behind ``python -m ghostfused bench``: check, then time eager against the fused backends."""

import copy
import time

import torch

from . import backends
from .convert import convert
from .models import ghostnetv2


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fused_backends(device: torch.device) -> list[str]:
    """The available fused backends (everything but eager) that run on ``device``."""
    return [b for b in backends.available_backends() if b != "eager" and backends.supports_device(b, device)]


def check_matches_eager(model: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference of the eval-mode logits; raises when it exceeds the tolerance."""
    with torch.no_grad():
        expected, actual = model(x), fused(x)
    error = (actual - expected).abs().max().item()
    tolerance = 1e-3 * max(1.0, expected.abs().max().item())
    if not error <= tolerance:
        raise AssertionError(f"fused model differs from eager by {error:.3g} (tolerance {tolerance:.3g})")
    return error


def time_call(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per call of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run(width: float = 1.0, batch_size: int = 8, resolution: int = 224, warmup: int = 2, iters: int = 5) -> list[dict]:
    """Check each fused backend against eager on ``ghostnetv2``, then time eval-mode inference; returns rows."""
    device = default_device()
    model = ghostnetv2(width, backend=None).to(device).eval()
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    rows = [{"provider": "eager", "error": 0.0}]
    for name in fused_backends(device):
        fused = convert(copy.deepcopy(model), backend=name)
        rows.append({"provider": name, "error": check_matches_eager(model, fused, x), "model": fused})
    rows[0]["model"] = model
    with torch.no_grad():
        for row in rows:
            row["seconds"] = time_call(lambda: row["model"](x), warmup, iters, device)
    for row in rows:
        row.pop("model")
        row["images_per_second"] = batch_size / row["seconds"]
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'provider':<10} {'ms/batch':>10} {'images/s':>10} {'vs eager':>9} {'max |diff|':>11}"]
    for row in rows:
        lines.append(f"{row['provider']:<10} {row['seconds'] * 1e3:>10.2f} {row['images_per_second']:>10.1f} "
                     f"{row['speedup']:>8.2f}x {row['error']:>11.2e}")
    return "\n".join(lines)
