"""``python -m ghostfused bench`` (check and time GhostNetV2 per provider) and ``python -m ghostfused train``."""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--width", type=float, default=None, help="ghostnetv2 channel width (default: 1.0)")
    parser.add_argument("--batch-size", type=_int_list, default=None,
                        help="inference batch sizes, comma-separated (default: 1,8 on CPU, 256 on GPU)")
    parser.add_argument("--train-batch-size", type=int, default=None,
                        help="training-step batch size, 0 for none (default: 8 on CPU, 128 on GPU)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: 224)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="autocast dtype: fp16 / bf16 on GPU, bf16 on CPU (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--channels-last", action="store_true", help="model and images in channels_last")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations per measurement (default: 10 on CPU, 50 on GPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed iterations first (default: 2 on CPU, 10 on GPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile of eager and of the default fused backend (default: on for "
                             "GPU, off for CPU, where a cold compile takes minutes)")
    parser.add_argument("--backends", type=_name_list, default=None,
                        help="fused backends to time, comma-separated; 'eager' adds the ops on the eager backend "
                             "(default: every available fused backend for the device)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the training step's peak memory (default: on)")
    parser.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=None,
                        help="GPU: time each attn module against its bandwidth floor (default: on)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for bench.json, bench.log and bench.png "
                             "(default: benchmarks/results/<device>-<date>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def bench_config(args: argparse.Namespace):
    """The :class:`ghostfused.benchmark.Config` of the parsed arguments, over the device's defaults."""
    from . import backends, benchmark

    device = torch.device(args.device) if args.device else benchmark.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is available")
    config = benchmark.Config.defaults(device)
    overrides = {"width": args.width, "batch_sizes": args.batch_size, "train_batch_size": args.train_batch_size,
                 "resolution": args.resolution, "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup,
                 "compile": args.compile, "backends": args.backends, "memory": args.memory,
                 "roofline": args.roofline, "seed": args.seed}
    for field, value in overrides.items():
        if value is not None:
            setattr(config, field, value)
    config.channels_last = args.channels_last
    for name in config.backends:
        backends.require(backends.check_name(name))
        if not backends.supports_device(name, device):
            raise SystemExit(f"--backends: {name} does not run on {device.type}")
    if config.iters < 1 or config.warmup < 0:
        raise SystemExit("--iters must be at least 1 and --warmup at least 0")
    return config


def bench(args: argparse.Namespace, command: str) -> int:
    from . import __version__, backends, benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    config = bench_config(args)
    started = benchmark.now()
    lines = []

    def log(line: str) -> None:
        lines.append(line)
        benchmark.echo(line)

    environment = benchmark.environment(config.device)
    log(f"$ {command}")
    log(f"ghostfused {__version__}, torch {torch.__version__}, triton {environment['triton']}; "
        f"{environment['device_name']}, {environment['threads']} threads; {started.isoformat(timespec='seconds')}")
    log(f"allocator environment: {environment['allocator_environment'] or 'none (glibc malloc defaults)'}")
    changes = environment["uncommitted_code"]
    log(f"commit {environment['git_commit'] or 'unknown'}"
        + (f", with uncommitted changes to {', '.join(changes)}" if changes else ""))
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        log(f"  backend {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    log(f"ghostnetv2 width {config.width}, {config.resolution}x{config.resolution}, {config.dtype}"
        f"{', channels_last' if config.channels_last else ''}; inference batch {config.batch_sizes}, training batch "
        f"{config.train_batch_size}; median of {config.iters} after {config.warmup} warm-up, providers interleaved in "
        f"blocks of {benchmark.TIMING_BLOCK}: " + ", ".join(p.name for p in benchmark.providers(config)))
    start = time.perf_counter()
    outcome = benchmark.run(config, log=log, progress=not args.no_progress)
    wall = time.perf_counter() - start
    log("")
    log(benchmark.format_table(outcome["results"]))
    memory_methods = sorted({r["memory"]["method"] for r in outcome["results"] if "method" in r.get("memory", {})})
    if memory_methods:
        log("peak MiB: the training step's peak memory; step MiB: its rise above the memory in use before the "
            f"step ({'; '.join(memory_methods)})")
    if outcome["roofline"]:
        log("")
        log(benchmark.format_roofline(outcome["roofline"]))
    for failure in outcome["failures"]:
        log(f"FAILED {failure['provider']}: {failure['error'][:1000]}")
    load = benchmark.load_average()
    log(f"wall time {wall:.0f} s; load average {environment['load_average']} before, {load} after "
        f"({environment['cpu_count']} CPUs: a load above that means other processes competed for them)")
    environment["load_average_after"] = load
    directory = args.output or Path("benchmarks/results") / (
        f"{benchmark.device_tag(config.device)}-{started.strftime('%Y%m%d-%H%M%S')}")
    report = {"command": command, "timestamp": started.isoformat(timespec="seconds"), "wall_seconds": wall,
              "environment": environment, "config": config.as_json()} | outcome
    written = benchmark.save(report, lines, directory)
    benchmark.echo("wrote " + ", ".join(str(p) for p in written))
    return 1 if outcome["failures"] else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghostfused", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_bench_arguments(commands.add_parser(
        "bench", help="check every provider against eager, then time ghostnetv2 inference and training"))
    from .train import add_arguments as add_train_arguments

    add_train_arguments(commands.add_parser("train", help="train ghostnetv2 on synthetic data or an image folder"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(args, shlex.join(["python", "-m", "ghostfused", *argv]))
    from .train import train

    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
