"""Op microbenchmarks of ghostfused: ``pytest benchmarks/`` (pytest-benchmark; ``triton.testing.do_bench`` on GPU).

Every op (``ghost_concat``, ``dfc_attention``, ``ghost_attn``) x Ghost-module shape of ``ghostnetv2_100`` at
224x224 x batch size x train / eval x forward / forward+backward x provider, each checked against a float64 eager
reference before it is timed. Options (defaults in brackets):

  --full                every distinct Ghost-module shape [the first and the last shape of each op]
  --providers LIST      eager, compile, eager-ops, cpu, triton, cuda [eager, compile on GPU, every fused backend]
  --batch-sizes LIST    [1,8 on CPU; 1,8,64,256 on GPU]
  --dtype fp32|bf16|fp16                 [fp32 on CPU, bf16 on GPU]
  --time-budget SECONDS CPU: timed calls per case [0.3]
  --summary-json PATH   every case's median time, speedup and check error, as JSON

The summary table at the end gives each case's median time per provider and its speedup over eager. On a GPU the
median comes from ``do_bench`` (CUDA events, L2 flushed); pytest-benchmark's own table there shows synchronised
wall-clock times, launch overhead included.
"""

import dataclasses
import json

import pytest
import torch

import op_cases
from ghostfused import backends, benchmark


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    batch_sizes: tuple[int, ...]
    providers: list[str]
    full: bool
    time_budget: float
    summary_json: str | None
    rows: list = dataclasses.field(default_factory=list)


SETTINGS = pytest.StashKey[Settings]()


def pytest_addoption(parser):
    group = parser.getgroup("ghostfused", "ghostfused op microbenchmarks")
    group.addoption("--full", action="store_true", help="every Ghost-module shape (default: first and last per op)")
    group.addoption("--providers", default=None, help="comma-separated providers (default: eager, compile on GPU, "
                                                      "every available fused backend)")
    group.addoption("--batch-sizes", default=None, help="comma-separated (default: 1,8 on CPU, 1,8,64,256 on GPU)")
    group.addoption("--dtype", default=None, choices=tuple(op_cases.DTYPES), help="default: fp32 CPU, bf16 GPU")
    group.addoption("--time-budget", type=float, default=0.3, help="CPU: seconds of timed calls per case")
    group.addoption("--summary-json", default=None, help="write the per-case summary to this JSON file")


def _settings(config) -> Settings:
    device = benchmark.default_device()
    providers = (config.getoption("--providers") or "").split(",")
    providers = [p for p in providers if p] or op_cases.default_providers(device)
    for name in providers:
        if name in ("eager", "compile", benchmark.EAGER_BACKEND_PROVIDER):
            continue
        reason = backends.unavailable_reason(backends.check_name(name))
        if reason is not None or not backends.supports_device(name, device):
            raise pytest.UsageError(f"--providers: {name} cannot run on {device.type} here: {reason or 'device'}")
    sizes = config.getoption("--batch-sizes")
    batch_sizes = tuple(int(b) for b in sizes.split(",")) if sizes else ((1, 8, 64, 256) if device.type == "cuda"
                                                                          else (1, 8))
    dtype = config.getoption("--dtype") or ("bf16" if device.type == "cuda" else "fp32")
    return Settings(device, op_cases.DTYPES[dtype], batch_sizes, providers, config.getoption("--full"),
                    config.getoption("--time-budget"), config.getoption("--summary-json"))


def pytest_configure(config):
    config.stash[SETTINGS] = _settings(config)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # eager at its best: cuDNN picks its fastest algorithms


def pytest_generate_tests(metafunc):
    if {"case", "provider"} <= set(metafunc.fixturenames):
        settings = metafunc.config.stash[SETTINGS]
        pairs = [(case, provider) for case in op_cases.cases(settings.full, settings.batch_sizes)
                 for provider in settings.providers]  # providers innermost: one case's reference serves them all
        metafunc.parametrize(("case", "provider"), pairs, ids=[f"{c.id}-{p}" for c, p in pairs])


@pytest.fixture
def settings(request) -> Settings:
    return request.config.stash[SETTINGS]


def _summary_lines(settings: Settings) -> list[str]:
    providers = list(dict.fromkeys(row["provider"] for row in settings.rows))
    groups = list(dict.fromkeys(row["group"] for row in settings.rows))
    medians = {(row["group"], row["provider"]): row["median_ms"] for row in settings.rows}
    width = max(len(g) for g in groups)
    lines = [f"{'case (median ms; speedup over eager)':<{width}}" + "".join(f" {p:>18}" for p in providers)]
    for group in groups:
        eager = medians.get((group, "eager"))
        cells = []
        for provider in providers:
            ms = medians.get((group, provider))
            if ms is None:
                cells.append(f" {'-':>18}")
            else:
                ratio = f" ({eager / ms:.2f}x)" if eager and provider != "eager" else ""
                cells.append(f" {f'{ms:.3f}{ratio}':>18}")
        lines.append(f"{group:<{width}}" + "".join(cells))
    return lines


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables, so that the short summary comes last
def pytest_terminal_summary(terminalreporter, config):
    settings = config.stash.get(SETTINGS, None)
    if settings is None or not settings.rows:
        return
    timed = [row for row in settings.rows if row["median_ms"] is not None]
    if timed:
        terminalreporter.section(f"ghostfused ops on {settings.device.type}, {settings.dtype}")
        for line in _summary_lines(dataclasses.replace(settings, rows=timed)):
            terminalreporter.write_line(line)
    if settings.summary_json:
        with open(settings.summary_json, "w") as f:
            json.dump({"environment": benchmark.environment(settings.device), "dtype": str(settings.dtype),
                       "rows": settings.rows}, f, indent=1)
        terminalreporter.write_line(f"wrote {settings.summary_json}")
