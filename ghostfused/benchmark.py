"""Model-level benchmark behind ``python -m ghostfused bench``.

One seeded ``ghostnetv2`` (dropout 0, BatchNorm running statistics calibrated on random batches so that eval mode
keeps activations at scale) is copied for every provider:

* ``eager``: the plain PyTorch model, the baseline of every ratio;
* ``compile``: ``torch.compile`` of the eager model;
* each available fused backend (``cpu``, ``triton``, ``cuda``; ``eager-ops`` is the ``eager`` backend, the ops
  dispatched to the reference functions, only when asked for);
* ``<backend>+compile``: the default fused backend's model under ``torch.compile``.

For each, the eval-mode logits and the first training step's loss are checked against eager (relative error,
tolerance by dtype); then eval-mode inference (per batch size) and a training step (forward, cross-entropy,
backward, SGD step) are timed: CUDA events after warm-up on a GPU, ``perf_counter`` on CPU, medians over the
iterations, the providers interleaved in blocks of ``TIMING_BLOCK`` timed calls (so that a machine shared with other
work slows them alike and their ratios hold, while each block runs in its provider's own steady state). The training
step's peak memory is measured (GPU: the caching allocator's peak; CPU: the peak resident set of a fresh process per
provider). On a GPU the roofline view times every 'attn' Ghost module alone against its bandwidth floor (SPEC
section 2). Everything, raw timings included, goes into a JSON file, a PNG chart and a log.
"""

import copy
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from . import backends, reference
from .convert import convert
from .models import ghostnetv2
from .train import AMP_DTYPES, TrainStep, autocast, current_memory_bytes, peak_memory_bytes, reset_peak_memory

# Largest relative error ||actual - eager|| / ||eager|| of logits (and of the first training loss) that passes,
# by compute dtype: float32 differs by summation order only; half precisions round at different places.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
ELEMENT_SIZES = {"fp32": 4, "fp16": 2, "bf16": 2}
NUM_CLASSES = 1000
# Calls of one provider in a row when the providers of a measurement are timed interleaved (time_interleaved).
TIMING_BLOCK = 5
EAGER_BACKEND_PROVIDER = "eager-ops"  # the ops with the `eager` backend (dispatch overhead), on request only


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fused_backends(device: torch.device) -> list[str]:
    """The fused backends worth timing on ``device``: available, runs there, and not Triton's CPU interpreter."""
    return [b for b in backends.available_backends()
            if b != "eager" and backends.supports_device(b, device) and not (b == "triton" and device.type != "cuda")]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (inf for a zero reference; NaN propagates)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    norm = torch.linalg.vector_norm(expected).item()
    diff = torch.linalg.vector_norm(actual - expected).item()
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


# ----------------------------------------------------------------------------------------------------------------
# Configuration and providers


@dataclasses.dataclass
class Config:
    """What ``python -m ghostfused bench`` measures (see ``--help`` for each field's meaning)."""

    device: torch.device
    width: float = 1.0
    resolution: int = 224
    batch_sizes: tuple[int, ...] = (1, 8)
    train_batch_size: int = 8  # 0: no training step
    dtype: str = "fp32"
    channels_last: bool = False
    warmup: int = 2
    iters: int = 10
    compile: bool = False
    backends: tuple[str, ...] = ()
    memory: bool = True
    roofline: bool = True  # CUDA only
    seed: int = 0

    @classmethod
    def defaults(cls, device: torch.device) -> "Config":
        """The defaults of ``device``: small batches and few iterations on CPU (``make bench`` stays under 5
        minutes on 2 cores, without torch.compile, whose cold compile takes minutes there); the SPEC's targets
        (bf16, batch 256 inference, 128 training, torch.compile) on a GPU."""
        if device.type == "cuda":
            return cls(device, batch_sizes=(256,), train_batch_size=128, dtype="bf16", warmup=10, iters=50,
                       compile=True, backends=tuple(fused_backends(device)))
        return cls(device, backends=tuple(fused_backends(device)))

    def as_json(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["device"] = str(self.device)
        return fields


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way to run the model: ``backend`` None is plain PyTorch; ``compiled`` wraps it in torch.compile."""

    name: str
    backend: str | None
    compiled: bool

    def build(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (same weights and BatchNorm state) run this provider's way."""
        model = copy.deepcopy(model)
        if self.backend is not None:
            model = convert(model, backend=self.backend)
        if not self.compiled:
            return model
        torch._dynamo.reset()  # a fresh cache per provider: the models share their forward code objects
        return torch.compile(model)


def providers(config: Config) -> list[Provider]:
    """eager, compile (with ``config.compile``), each backend of ``config.backends``, then the default fused
    backend compiled (with ``config.compile``)."""
    result = [Provider("eager", None, False)]
    if config.compile:
        result.append(Provider("compile", None, True))
    result += [Provider(EAGER_BACKEND_PROVIDER if b == "eager" else b, b, False) for b in config.backends]
    fused = [b for b in config.backends if b != "eager"]
    if config.compile and fused:
        preferred = [b for b in backends.AUTO_ORDER.get(config.device.type, ()) if b in fused] or fused
        result.append(Provider(f"{preferred[0]}+compile", preferred[0], True))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Timing


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int,
                     block: int = 1,
                     on_error: Callable[[str, Exception], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each of ``iters`` calls of every function in ``calls``, interleaved in blocks: every round calls
    each function ``block`` times in a row, in order, so that a change of the machine's speed while they run
    (another process, the clock) reaches them all alike rather than whichever was being timed; a block of more than
    one call starts with one untimed call, so that its timed calls find the function's own steady state (caches,
    the allocator's free lists) rather than what the previous function left. ``warmup`` untimed rounds of one call
    first. CUDA events around each call on a GPU (one synchronisation at the end), ``time.perf_counter`` on CPU. A
    function that raises is dropped (its times with it) after ``on_error(name, error)``; without ``on_error`` the
    error propagates."""
    calls = dict(calls)
    times = {name: [] for name in calls}
    cuda = device.type == "cuda"
    events = {name: [] for name in calls}

    def call(name, fn, timed: bool) -> None:
        try:
            if cuda and timed:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
            elif timed:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            else:
                fn()
        except Exception as error:
            if on_error is None:
                raise
            on_error(name, error)
            del calls[name], times[name]

    # (untimed, timed) calls of each function per round
    rounds = [(1, 0)] * warmup + [(int(block > 1), min(block, iters - start)) for start in range(0, iters, block)]
    for untimed, timed in rounds:
        for name, fn in list(calls.items()):
            for i in range(untimed + timed):
                if name in calls:
                    call(name, fn, timed=i >= untimed)
    if cuda:
        torch.cuda.synchronize(device)
        for name in times:
            times[name] = [start.elapsed_time(end) / 1e3 for start, end in events[name]]
    return times


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (:func:`time_interleaved`)."""
    return time_interleaved({"fn": fn}, device, warmup, iters)["fn"]


def median_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Median seconds of one call of ``fn``: on a GPU ``triton.testing.do_bench`` (L2 flushed between calls) when
    Triton imports, else CUDA events; on CPU the median of 10 timed calls after 2."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        return statistics.median(time_calls(fn, device, warmup=10, iters=50))
    return statistics.median(time_calls(fn, device, warmup=2, iters=10))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    seconds = statistics.median(time_calls(lambda: target.copy_(source), device, warmup=3, iters=20))
    del source, target
    return 2 * nbytes / seconds


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
            "times_s": times}


# ----------------------------------------------------------------------------------------------------------------
# The model and its Ghost modules


def ghost_module_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, input shape) of every Ghost module of ``model`` as ``model(x)`` calls them, in call order,
    found with forward hooks (so the shapes are the model's own, at x's batch size and resolution)."""
    found = []
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: found.append((name, m, tuple(args[0].shape))))
             for name, module in model.named_modules() if isinstance(module, reference.GhostModuleV2)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def calibrate_batch_norms(model: nn.Module, x: torch.Tensor, batches: int = 2) -> None:
    """Give every BatchNorm running statistics of real activations (cumulative averages over ``batches`` training
    forwards on random inputs like ``x``), so that eval mode neither vanishes nor explodes activations. Leaves the
    model in eval mode with its momenta restored and ``num_batches_tracked`` reset."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn_like(x))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.num_batches_tracked.zero_()
    model.eval()


def build_model(config: Config) -> nn.Module:
    """The seeded, calibrated eager ``ghostnetv2`` of ``config``, on its device and layout, in eval mode."""
    torch.manual_seed(config.seed)
    model = ghostnetv2(config.width, num_classes=NUM_CLASSES, dropout=0.0, backend=None).to(config.device)
    calibrate_batch_norms(model, torch.randn(8, 3, config.resolution, config.resolution, device=config.device))
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def make_inputs(config: Config, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images [N, 3, R, R] (float32, in the configured layout) and class targets [N]."""
    generator = torch.Generator(device=config.device).manual_seed(seed)
    images = torch.randn(batch_size, 3, config.resolution, config.resolution, device=config.device,
                         generator=generator)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(NUM_CLASSES, (batch_size,), device=config.device, generator=generator)
    return images, targets


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of a training step


def memory_child(spec: dict) -> dict:
    """Peak memory of one training step in this (fresh) process: two warm-up steps, then the peak resident set
    during a third, as an absolute figure and above the resident set just before it. ``spec``: the JSON form of a
    :class:`Config` plus ``backend`` (None: plain PyTorch)."""
    torch.set_num_threads(spec["threads"])
    config = Config(torch.device(spec["device"]), width=spec["width"], resolution=spec["resolution"],
                    train_batch_size=spec["train_batch_size"], dtype=spec["dtype"],
                    channels_last=spec["channels_last"], seed=spec["seed"])
    provider = Provider("memory", spec["backend"], False)
    model = provider.build(build_model(config)).train()
    step = TrainStep(model, _optimizer(model), config.device, AMP_DTYPES[config.dtype])
    images, targets = make_inputs(config, config.train_batch_size, seed=2)
    for _ in range(2):
        step(images, targets)
    gc.collect()
    method = reset_peak_memory(config.device)
    before = current_memory_bytes(config.device)
    step(images, targets)
    peak = peak_memory_bytes(config.device)
    return {"peak_bytes": peak, "step_bytes": peak - before, "method": method + ", fresh process per provider"}


def measure_memory_in_subprocess(config: Config, provider: Provider, timeout: float = 300) -> dict:
    """:func:`memory_child` in a fresh Python process for ``provider`` (not compiled), with glibc's mmap threshold
    fixed at 64 KiB so that freed tensors leave the resident set, as freed CUDA memory leaves the allocated count."""
    if provider.compiled:
        raise ValueError("peak memory in a fresh process is not measured for compiled providers (cold compile)")
    spec = config.as_json() | {"backend": provider.backend, "threads": torch.get_num_threads()}
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    code = ("import json, sys; from ghostfused.benchmark import memory_child; "
            "print(json.dumps(memory_child(json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement for {provider.name} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory_in_process(step: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one call of ``step`` (a training step) on a CUDA device, from the caching allocator."""
    gc.collect()
    method = reset_peak_memory(device)
    before = current_memory_bytes(device)
    step()
    peak = peak_memory_bytes(device)
    return {"peak_bytes": peak, "step_bytes": peak - before, "method": method}


# ----------------------------------------------------------------------------------------------------------------
# The run


def echo(line: str) -> None:
    """Print ``line`` above the progress bar (through tqdm when it imports, so the bar is redrawn below)."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, flush=True)
    else:
        tqdm.write(line)


class _Progress:
    """A tqdm bar on stderr when tqdm imports (and ``enabled``), else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="task", dynamic_ncols=True, leave=False, disable=None)

    def step(self, description: str, done: bool = False) -> None:
        if self.bar is not None:
            self.bar.set_description(description)
            if done:
                self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(config: Config, log: Callable[[str], None] = echo, progress: bool = True) -> dict:
    """Check and time every provider; returns the JSON file's ``results`` (one row per provider, phase and batch
    size, raw times included; training rows carry ``memory``), ``failures`` and ``roofline`` (None off GPUs).
    The providers of one measurement are timed interleaved in blocks of ``TIMING_BLOCK`` (:func:`time_interleaved`).
    ``log`` receives one line per finished measurement."""
    device, amp_dtype = config.device, AMP_DTYPES[config.dtype]
    if config.dtype == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a GPU (autocast on CPU runs in bf16)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # eager at its best: cuDNN picks its fastest algorithms
    base = build_model(config)
    inference_inputs = {b: make_inputs(config, b, seed=1)[0] for b in config.batch_sizes}
    train_inputs = make_inputs(config, config.train_batch_size, seed=2) if config.train_batch_size else None
    provider_list = providers(config)
    memory_in_process = config.memory and device.type == "cuda"
    phases = len(config.batch_sizes) + (1 if train_inputs else 0)
    bar = _Progress(len(provider_list) * (2 + memory_in_process if train_inputs else 1) + phases, progress)
    tolerance = TOLERANCES[config.dtype]
    results, failures, references = [], [], {}

    def infer(model, x):
        with torch.no_grad(), autocast(device, amp_dtype):
            return model(x)

    def fail(name: str, error: Exception) -> None:  # one provider's failure must not hide the others' figures
        failures.append({"provider": name, "error": f"{type(error).__name__}: {error}"})
        log(f"FAILED {name}: {type(error).__name__}: {str(error)[:500]}")
        models.pop(name, None)
        steps.pop(name, None)

    def record(phase: str, batch_size: int, times: dict[str, list[float]], errors: dict[str, float]) -> None:
        for name, provider_times in times.items():
            results.append({"provider": name, "phase": phase, "batch_size": batch_size, "check_error": errors[name]}
                           | summarize(provider_times))
            log(_measurement_line(results[-1]))

    # Every provider is built and checked first; each measurement then times all of them interleaved.
    models, steps, errors = {}, {}, {}
    for provider in provider_list:
        bar.step(f"{provider.name}: build and check")
        try:
            model = provider.build(base).eval()
            logits = infer(model, inference_inputs[config.batch_sizes[0]]).float()
            references.setdefault("logits", logits)
            errors[provider.name] = relative_error(logits, references["logits"])
            if not errors[provider.name] <= tolerance:
                raise AssertionError(f"eval logits differ from eager by {errors[provider.name]:.3g} (relative; "
                                     f"tolerance {tolerance})")
            models[provider.name] = model
        except Exception as error:
            fail(provider.name, error)
        bar.step(f"{provider.name}: checked", done=True)
    for batch_size, x in inference_inputs.items():
        bar.step(f"inference, batch {batch_size}")
        times = time_interleaved({name: functools.partial(infer, model, x) for name, model in models.items()},
                                 device, config.warmup, config.iters, TIMING_BLOCK, fail)
        record("inference", batch_size, times, errors)
        bar.step(f"inference, batch {batch_size}", done=True)
    if train_inputs is not None:
        for name, model in list(models.items()):
            bar.step(f"{name}: training step check")
            try:
                step = TrainStep(model.train(), _optimizer(model), device, amp_dtype)
                loss = step(*train_inputs).item()
                references.setdefault("loss", loss)
                errors[name] = abs(loss - references["loss"]) / abs(references["loss"])
                if not errors[name] <= tolerance:
                    raise AssertionError(f"first training loss {loss:.6g} differs from eager's "
                                         f"{references['loss']:.6g} by {errors[name]:.3g} (relative; "
                                         f"tolerance {tolerance})")
                steps[name] = step
            except Exception as error:
                fail(name, error)
            bar.step(f"{name}: training step checked", done=True)
        bar.step(f"training step, batch {config.train_batch_size}")
        times = time_interleaved({name: functools.partial(step, *train_inputs) for name, step in steps.items()},
                                 device, config.warmup, config.iters, TIMING_BLOCK, fail)
        record("train", config.train_batch_size, times, errors)
        bar.step(f"training step, batch {config.train_batch_size}", done=True)
        for name, step in list(steps.items()) if memory_in_process else ():
            try:
                row = next(r for r in results if r["provider"] == name and r["phase"] == "train")
                row["memory"] = measure_memory_in_process(functools.partial(step, *train_inputs), device)
            except Exception as error:
                fail(name, error)
            bar.step(f"{name}: memory", done=True)
    order = {provider.name: i for i, provider in enumerate(provider_list)}
    results.sort(key=lambda row: (order[row["provider"]], row["phase"] == "train"))  # stable: batch sizes in order
    del models, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bar.close()
    failed = {f["provider"] for f in failures}
    if config.memory and train_inputs is not None and device.type != "cuda":
        measure_cpu_memory(config, [p for p in provider_list if p.name not in failed], results, failures, log)
    add_ratios(results)
    roofline = None
    if config.roofline and device.type == "cuda":
        fused = [p for p in provider_list if p.backend not in (None, "eager") and not p.compiled]
        roofline = measure_roofline(config, base, [p.backend for p in fused if p.name not in failed], log)
    return {"results": results, "failures": failures, "roofline": roofline}


def measure_cpu_memory(config: Config, provider_list: list[Provider], results: list[dict], failures: list[dict],
                       log: Callable[[str], None]) -> None:
    """Attach the peak memory of a training step, one fresh process per provider, to the ``train`` results."""
    train_rows = {r["provider"]: r for r in results if r["phase"] == "train"}
    for provider in provider_list:
        if provider.name not in train_rows:
            continue
        if provider.compiled:
            train_rows[provider.name]["memory"] = {"skipped": "compiled providers are not measured in a fresh "
                                                              "process (a cold compile takes minutes on CPU)"}
            continue
        try:
            memory = measure_memory_in_subprocess(config, provider)
        except Exception as error:
            failures.append({"provider": provider.name, "error": f"memory: {type(error).__name__}: {error}"})
            log(f"FAILED memory of {provider.name}: {error}")
            continue
        train_rows[provider.name]["memory"] = memory
        log(f"{provider.name:<16} training step peak memory {memory['peak_bytes'] / 2**20:8.1f} MiB "
            f"({memory['step_bytes'] / 2**20:+.1f} MiB during the step)")


def add_ratios(results: list[dict]) -> None:
    """``speedup_vs_eager`` (and ``speedup_vs_compile`` where compile ran) and ``images_per_second`` per row."""
    medians = {(r["provider"], r["phase"], r["batch_size"]): r["median_s"] for r in results}
    for row in results:
        row["images_per_second"] = row["batch_size"] / row["median_s"]
        for baseline in ("eager", "compile"):
            reference_time = medians.get((baseline, row["phase"], row["batch_size"]))
            if reference_time is not None:
                row[f"speedup_vs_{baseline}"] = reference_time / row["median_s"]


def measure_roofline(config: Config, base: nn.Module, backend_names: list[str],
                     log: Callable[[str], None] = echo, copy_bytes: int = 1 << 30) -> dict:
    """Each 'attn' Ghost module alone, forward in eval mode at the largest inference batch, against its bandwidth
    floor: read x once and write the output once (SPEC section 2), over the copy bandwidth measured with
    ``copy_bytes`` buffers. Meant for GPUs (``run`` calls it there only); it runs on CPU too."""
    from .nn import GhostModuleV2

    device = config.device
    dtype = AMP_DTYPES[config.dtype] or torch.float32
    element_size = ELEMENT_SIZES[config.dtype]
    bandwidth = copy_bandwidth(device, copy_bytes)
    log(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s (device-to-device, read + write)")
    batch_size = max(config.batch_sizes)
    x_full = make_inputs(config, batch_size, seed=3)[0]
    modules = [(name, module, shape) for name, module, shape in ghost_module_inputs(base, x_full)
               if getattr(module, "mode", None) == "attn"]
    del x_full
    rows = []
    for name, module, shape in modules:
        x = torch.randn(shape, device=device, dtype=dtype)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out_elements = shape[0] * module.oup * shape[2] * shape[3]
        floor_bytes = (x.numel() + out_elements) * element_size
        floor_s = floor_bytes / bandwidth
        eager = copy.deepcopy(module).to(dtype).eval()
        with torch.no_grad():
            row = {"module": name, "input_shape": list(shape), "oup": module.oup, "floor_bytes": floor_bytes,
                   "floor_s": floor_s, "eager_s": median_seconds(lambda: eager(x), device), "backends": {}}
            for backend in backend_names:
                fused = GhostModuleV2.from_module(copy.deepcopy(module), backend).to(dtype).eval()
                seconds = median_seconds(lambda: fused(x), device)
                row["backends"][backend] = {"seconds": seconds, "percent_of_floor": 100 * floor_s / seconds}
        rows.append(row)
        log(_roofline_line(row))
    return {"copy_bandwidth_bytes_per_s": bandwidth, "batch_size": batch_size, "dtype": config.dtype,
            "modules": rows}


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _measurement_line(row: dict) -> str:
    return (f"{row['provider']:<16} {row['phase']:<9} batch {row['batch_size']:<4} "
            f"median {row['median_s'] * 1e3:9.2f} ms  (min {row['min_s'] * 1e3:.2f}, {len(row['times_s'])} runs)")


def _roofline_line(row: dict) -> str:
    parts = [f"{name} {b['seconds'] * 1e6:.1f} us ({b['percent_of_floor']:.0f}%)"
             for name, b in row["backends"].items()]
    return (f"{row['module']:<20} x {tuple(row['input_shape'])} -> {row['oup']} ch: floor "
            f"{row['floor_s'] * 1e6:.1f} us, eager {row['eager_s'] * 1e6:.1f} us; " + ", ".join(parts))


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def format_table(results: list[dict]) -> str:
    """The main table: per phase and batch size, each provider's median ms/batch (and the fastest run: far below
    the median, it shows interference), images/s, ratios, check error and training-step peak memory."""
    header = (f"{'phase':<16} {'provider':<16} {'ms/batch':>10} {'(min)':>9} {'images/s':>10} {'vs eager':>9} "
              f"{'vs compile':>10} {'check err':>10} {'peak MiB':>9} {'step MiB':>9}")
    lines = [header, "-" * len(header)]
    for row in results:
        memory = row.get("memory", {})
        peak = f"{memory['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in memory else "-"
        step = f"{memory['step_bytes'] / 2**20:.0f}" if "step_bytes" in memory else "-"
        lines.append(f"{row['phase'] + ' b' + str(row['batch_size']):<16} {row['provider']:<16} "
                     f"{row['median_s'] * 1e3:>10.2f} {row['min_s'] * 1e3:>9.2f} {row['images_per_second']:>10.1f} "
                     f"{_ratio(row, 'speedup_vs_eager'):>9} {_ratio(row, 'speedup_vs_compile'):>10} "
                     f"{row['check_error']:>10.1e} {peak:>9} {step:>9}")
    return "\n".join(lines)


def format_roofline(roofline: dict) -> str:
    backend_names = sorted({b for row in roofline["modules"] for b in row["backends"]})
    header = (f"{'attn module':<20} {'x shape':<22} {'oup':>5} {'floor MB':>9} {'floor us':>9} {'eager us':>9}"
              + "".join(f" {name + ' us':>11} {'% floor':>8}" for name in backend_names))
    lines = [f"roofline: {roofline['dtype']}, batch {roofline['batch_size']}, copy bandwidth "
             f"{roofline['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; floor = read x once + write the output once",
             header, "-" * len(header)]
    for row in roofline["modules"]:
        line = (f"{row['module']:<20} {str(tuple(row['input_shape'])):<22} {row['oup']:>5} "
                f"{row['floor_bytes'] / 1e6:>9.2f} {row['floor_s'] * 1e6:>9.1f} {row['eager_s'] * 1e6:>9.1f}")
        for name in backend_names:
            b = row["backends"].get(name)
            line += f" {b['seconds'] * 1e6:>11.1f} {b['percent_of_floor']:>7.0f}%" if b else f" {'-':>11} {'-':>8}"
        lines.append(line)
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_commit() -> str | None:
    commit = _git("rev-parse", "HEAD")
    return None if commit is None else commit.strip()


def _code_changes() -> list[str] | None:
    """Files of the package's source (ghostfused/, csrc/) that differ from the commit: figures measured with them
    are not the commit's."""
    changed = _git("status", "--porcelain", "--", ":/ghostfused", ":/csrc", ":/setup.py")
    return None if changed is None else [line[3:] for line in changed.splitlines()]


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): a load above the CPU count means other
    processes competed for the CPUs while timing."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def allocator_environment() -> dict:
    """The environment variables that change how the host allocates memory (glibc tunables, a preloaded malloc, the
    bound of the cpu kernels' block cache): on a CPU they decide whether each large tensor costs fresh zeroed pages
    (README, Results)."""
    names = ("GLIBC_TUNABLES", "LD_PRELOAD", "GHOSTFUSED_CPU_CACHE_MB")
    return {k: v for k, v in os.environ.items() if k in names or k.startswith("MALLOC_")}


def environment(device: torch.device) -> dict:
    """Device name, versions, thread count and commit: what the JSON file records beside the figures."""
    from . import __version__

    info = {"device_type": device.type, "device_name": _cpu_name(), "cpu": _cpu_name(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average": load_average(), "platform": platform.platform(),
            "allocator_environment": allocator_environment(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "ghostfused": __version__, "git_commit": _git_commit(), "uncommitted_code": _code_changes(),
            "cuda": torch.version.cuda,
            "available_backends": backends.available_backends(),
            "unavailable_backends": {name: backends.unavailable_reason(name) for name in backends.BACKENDS
                                     if backends.unavailable_reason(name) is not None}}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {"device_name": properties.name, "compute_capability": f"{properties.major}.{properties.minor}",
                 "multiprocessors": properties.multi_processor_count,
                 "memory_bytes": properties.total_memory}
    return info


def device_tag(device: torch.device) -> str:
    """A short name for result folders: ``cpu``, or the GPU's name in lower case (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def write_chart(report: dict, path: Path) -> bool:
    """A PNG of throughput and speedup per provider (and the roofline percentages on a GPU); False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = report["results"]
    phases = list(dict.fromkeys(f"{r['phase']} b{r['batch_size']}" for r in results))
    names = list(dict.fromkeys(r["provider"] for r in results))
    roofline = report.get("roofline")
    panels = 3 if roofline and roofline["modules"] else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    width = 0.8 / max(1, len(names))
    for panel, (key, label) in enumerate((("images_per_second", "images/s"), ("speedup_vs_eager", "x eager"))):
        axis = axes[panel]
        for i, name in enumerate(names):
            values = [next((r.get(key, 0) for r in results if r["provider"] == name
                            and f"{r['phase']} b{r['batch_size']}" == phase), 0) for phase in phases]
            bars = axis.bar([p + i * width for p in range(len(phases))], values, width, label=name)
            axis.bar_label(bars, fmt="%.3g", fontsize=7)
        axis.set_xticks([p + width * (len(names) - 1) / 2 for p in range(len(phases))], phases)
        axis.set_ylabel(label)
        if key == "speedup_vs_eager":
            axis.axhline(1.0, color="gray", linewidth=0.8)
    axes[0].legend(fontsize=8)
    environment_info = report["environment"]
    figure.suptitle(f"ghostnetv2 width {report['config']['width']}, {report['config']['dtype']}, "
                    f"{report['config']['resolution']}px on {environment_info['device_name']} "
                    f"({environment_info['threads']} threads)", fontsize=10)
    if panels == 3:
        axis = axes[2]
        modules = roofline["modules"]
        backend_names = sorted({b for row in modules for b in row["backends"]})
        bar_width = 0.8 / max(1, len(backend_names))
        for i, name in enumerate(backend_names):
            values = [row["backends"].get(name, {}).get("percent_of_floor", 0) for row in modules]
            axis.bar([p + i * bar_width for p in range(len(modules))], values, bar_width, label=name)
        axis.axhline(70, color="red", linewidth=0.8, linestyle="--", label="target 70%")
        axis.set_xticks(range(len(modules)), [row["module"].removeprefix("blocks.") for row in modules],
                        rotation=60, fontsize=7)
        axis.set_ylabel("% of bandwidth floor (attn modules, eval forward)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def save(report: dict, log_lines: list[str], directory: Path) -> list[Path]:
    """Write ``bench.json``, ``bench.log`` and (with matplotlib) ``bench.png`` into ``directory``; returns them."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "bench.json", directory / "bench.log"]
    written[0].write_text(json.dumps(report, indent=1) + "\n")
    written[1].write_text("\n".join(log_lines) + "\n")
    if write_chart(report, directory / "bench.png"):
        written.append(directory / "bench.png")
    return written


def now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()
