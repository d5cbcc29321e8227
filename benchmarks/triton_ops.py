"""GPU microbenchmark of the Triton backend's fused ops against eager PyTorch and torch.compile of the eager modules.

For every Ghost module shape of ghostnetv2_100 at 224x224 ('attn' modules for ``ghost_attn`` and
``dfc_attention``, 'original' ones for ``ghost_concat``) and batch 1, 8, 64, 256, it times (``triton.testing.do_bench``,
median ms) the forward in eval mode and forward + backward in train mode, and prints the bandwidth floor: the
bytes of reading the inputs once and writing the output once (plus, for forward + backward, reading grad_out and x
and writing grad_x once), divided by the device's measured copy bandwidth, and the percentage of it reached.

    python benchmarks/triton_ops.py [--batches 1 8 64 256] [--dtype bfloat16] [--ops ghost_attn ...]

Needs a CUDA GPU; importing it does not.
"""

import argparse
import copy
from typing import NamedTuple

import torch

from ghostfused import reference

OPS = ("ghost_attn", "dfc_attention", "ghost_concat")
BATCHES = (1, 8, 64, 256)


class ModuleShape(NamedTuple):
    """A Ghost module of the network: input channels, output channels, resolution and mode."""

    inp: int
    oup: int
    height: int
    width: int
    mode: str


def ghostnetv2_shapes(width: float = 1.0, resolution: int = 224) -> list[ModuleShape]:
    """The distinct Ghost module shapes of GhostNetV2 at ``resolution``, in network order (traced on the meta
    device, so nothing is computed)."""
    model = reference.GhostNetV2(width).to("meta")
    shapes = []

    def record(module, inputs, _output):
        x = inputs[0]
        shape = ModuleShape(x.shape[1], module.oup, x.shape[2], x.shape[3], module.mode)
        if shape not in shapes:
            shapes.append(shape)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, reference.GhostModuleV2)]
    with torch.no_grad():
        model(torch.empty(1, 3, resolution, resolution, device="meta"))
    for hook in hooks:
        hook.remove()
    return shapes


def floor_bytes(op: str, batch: int, shape: ModuleShape, element_size: int, backward: bool = False) -> int:
    """Bytes of the bandwidth floor: read x (and, for ``dfc_attention``, ``features``) once, write the output once;
    with ``backward``, also read grad_out and x and write grad_x (and grad_features) once. Weights are negligible."""
    pixels = batch * shape.height * shape.width
    inputs = shape.inp + (shape.oup if op == "dfc_attention" else 0)
    total = inputs + shape.oup
    if backward:
        total += shape.oup + inputs + inputs  # read grad_out and the inputs, write their gradients
    return pixels * total * element_size


def copy_bandwidth(device: torch.device, size: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes per second (read + write of a ``size``-byte buffer)."""
    import triton.testing

    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * size / (ms * 1e-3)


class _DfcAttention(torch.nn.Module):
    """``features * upsample(gate(x))`` with a GhostModuleV2's DFC branch: eager (``fused=False``, also compiled)
    or the fused ``dfc_attention`` op on the triton backend."""

    def __init__(self, module: reference.GhostModuleV2, fused: bool):
        super().__init__()
        self.module, self.fused = module, fused

    def forward(self, x, features):
        s = self.module.short_conv
        if self.fused:
            from ghostfused import ops

            return ops.dfc_attention(x, features, s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5],
                                     training=self.training, backend="triton")
        gate = self.module.gate_fn(s(torch.nn.functional.avg_pool2d(x, 2, 2)))
        return features * torch.nn.functional.interpolate(gate, size=features.shape[-2:], mode="nearest")


def _providers(op: str, shape: ModuleShape, dtype: torch.dtype, device: torch.device):
    """(name, module taking the op's tensor inputs) for eager, torch.compile and the triton backend."""
    import ghostfused

    module = reference.GhostModuleV2(shape.inp, shape.oup, mode="attn" if op != "ghost_concat" else "original")
    module = module.to(device=device, dtype=dtype)
    if op == "dfc_attention":
        eager, fused = _DfcAttention(module, fused=False), _DfcAttention(copy.deepcopy(module), fused=True)
    else:
        eager, fused = module, ghostfused.convert(copy.deepcopy(module), backend="triton")
    return [("eager", eager), ("compile", torch.compile(copy.deepcopy(eager))), ("triton", fused)]


def _inputs(op: str, batch: int, shape: ModuleShape, dtype: torch.dtype, device: torch.device, grad: bool):
    x = torch.randn(batch, shape.inp, shape.height, shape.width, dtype=dtype, device=device, requires_grad=grad)
    if op != "dfc_attention":
        return (x,)
    features = torch.randn(batch, shape.oup, shape.height, shape.width, dtype=dtype, device=device,
                           requires_grad=grad)
    return x, features


def bench(op: str, shape: ModuleShape, batch: int, dtype: torch.dtype, device: torch.device,
          bandwidth: float) -> list[dict]:
    """Rows (one per provider and mode) of median ms and percentage of the bandwidth floor."""
    import triton.testing

    rows = []
    providers = _providers(op, shape, dtype, device)
    element_size = torch.empty((), dtype=dtype).element_size()
    for mode in ("eval", "train"):
        training = mode == "train"
        inputs = _inputs(op, batch, shape, dtype, device, grad=training)
        floor_ms = floor_bytes(op, batch, shape, element_size, backward=training) / bandwidth * 1e3
        for name, provider in providers:
            provider.train(training)
            if training:
                grad = torch.randn(batch, shape.oup, shape.height, shape.width, dtype=dtype, device=device)

                def step(provider=provider, grad=grad):
                    provider(*inputs).backward(grad)
            else:
                def step(provider=provider):
                    with torch.no_grad():
                        provider(*inputs)
            # gradients reset between runs, so that no accumulation kernel is timed
            resets = list(inputs) + list(provider.parameters()) if training else None
            ms = triton.testing.do_bench(step, grad_to_none=resets, return_mode="median")
            rows.append(dict(op=op, shape=shape, batch=batch, mode=mode, provider=name, ms=ms, floor_ms=floor_ms,
                             floor_percent=100 * floor_ms / ms))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/triton_ops.py needs a CUDA GPU")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, dtype {args.dtype}")
    print(f"{'op':<14} {'Cin->Cout@HxW':<18} {'N':>4} {'mode':<5} {'provider':<8} {'ms':>9} {'floor ms':>9} "
          f"{'% floor':>8}")
    shapes = ghostnetv2_shapes()
    for op in args.ops:
        wanted = "original" if op == "ghost_concat" else "attn"
        for shape in (s for s in shapes if s.mode == wanted):
            for batch in args.batches:
                for row in bench(op, shape, batch, dtype, device, bandwidth):
                    s = row["shape"]
                    label = f"{s.inp}->{s.oup}@{s.height}x{s.width}"
                    print(f"{op:<14} {label:<18} {batch:>4} {row['mode']:<5} {row['provider']:<8} "
                          f"{row['ms']:>9.4f} {row['floor_ms']:>9.4f} {row['floor_percent']:>7.1f}%")


if __name__ == "__main__":
    main()
