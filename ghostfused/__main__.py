"""``python -m ghostfused bench``: the main job (correctness check and model-level timing)."""

import argparse
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghostfused", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="check the fused backends against eager and time ghostnetv2")
    bench.add_argument("--width", type=float, default=1.0)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--resolution", type=int, default=224)
    bench.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)

    from . import __version__, backends, benchmark

    device = benchmark.default_device()
    print(f"ghostfused {__version__}, torch {torch.__version__}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} ({torch.get_num_threads()} threads)")
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"ghostnetv2 width {args.width}, eval, batch {args.batch_size}, {args.resolution}x{args.resolution}, "
          f"median of {args.iters}")
    rows = benchmark.run(args.width, args.batch_size, args.resolution, iters=args.iters)
    print(benchmark.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
