"""CPU microbenchmark of the fused ops: the ``cpu`` backend against the eager composition of the reference modules.

For every 'attn' Ghost module shape of ghostnetv2_100 at 224x224 (Cin, oup, H = W), batch 1 and 8, eval (forward)
and train (forward + backward), each op runs side by side with its eager composition in one process, interleaved
call by call, and the table shows medians and their ratio:

* ghost_concat: primary conv + BN + ReLU, cheap depthwise + BN + ReLU, cat, slice (an 'original' module);
* dfc_attention: features * upsample(sigmoid(short_conv(avg_pool(x))));
* ghost_attn: the whole 'attn' module.

``--depthwise`` times ``ops.depthwise_bn`` against eager Conv2d + BatchNorm2d on the model's nine depthwise pairs, then
the fused model with and without them fused.
``--overhead`` also times, at batch 1 in eval, the fused module and the public op against the raw kernel (called
through the extension's entry point ``ghostfused._C.<op>_forward`` and through ``torch.ops.ghostfused_C``), to show
the cost of the Python path.
``--model`` adds ghostnetv2_100 inference (batch 1 and 8) and a training step (batch 8: forward, backward, SGD):
eager and the fused cpu backend, each in NCHW and in channels_last (eager NCHW is the baseline), and for inference
ONNX Runtime running the exported eager model (when onnxruntime is installed);
``--profile`` splits the fused model's time in those three phases into the fused kernels' own work, the GEMMs they
call and everything else; ``--faults`` counts the minor page faults per call of eager and the fused model in those
phases (run it with ``GHOSTFUSED_CPU_CACHE_MB=0`` to see the cpu kernels without their block cache), and
``--alone`` the same with each model in a process of its own;
``--gemm`` times the 1x1 convolution choices of csrc/cpu/common.cpp.

The machine may be shared: figures are medians of interleaved runs, and ratios are what to compare. With
``--threads 1 --cpu-time`` the clock is the process's CPU time, which other processes on the machine do not inflate
(only meaningful single-threaded).

    .venv/bin/python benchmarks/cpu_ops.py --threads 2 [--batch 1 8] [--overhead] [--model]
"""

import argparse
import copy
import datetime
import io
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import ghostfused
from ghostfused import ops, reference
from ghostfused.benchmark import environment
from ghostfused.models import ghostnetv2
from ghostfused.testing import randomize_batch_norms

# (Cin, oup, H) of the 'attn' Ghost modules of ghostnetv2_100 at 224x224, and how many the model has.
ATTN_SHAPES = [(24, 72, 56, 2), (40, 120, 28, 1), (40, 240, 28, 1), (80, 200, 14, 1), (80, 184, 14, 2),
               (80, 480, 14, 1), (112, 672, 14, 2), (160, 960, 7, 4)]


CLOCK = time.perf_counter


def side_by_side(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each callable, run interleaved (one call of each per round)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def training_step(model, x, target):
    """One SGD step of ``model`` on ``(x, target)`` as a callable: forward, cross-entropy, backward, update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run():
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    return run


def op_calls(op: str, cin: int, oup: int, size: int, batch: int, training: bool):
    """(eager, fused) callables of one op at one shape."""
    mode = "attn" if op != "ghost_concat" else "original"
    module = randomize_batch_norms(reference.GhostModuleV2(cin, oup, mode=mode))
    module.train(training)
    fused = ghostfused.convert(copy.deepcopy(module), backend="cpu")
    x = torch.randn(batch, cin, size, size, requires_grad=training)
    grad = torch.randn(batch, oup, size, size)
    if op == "dfc_attention":
        features = torch.randn(batch, oup, size, size, requires_grad=training)
        short = module.short_conv
        fused_short = copy.deepcopy(short)

        def eager():
            gate = torch.sigmoid(short(F.avg_pool2d(x, 2, 2)))
            return features * F.interpolate(gate, size=(size, size), mode="nearest")

        def fused_call():
            s = fused_short
            return ops.dfc_attention(x, features, s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5],
                                     training=training, backend="cpu")
    else:
        def eager():
            return module(x)

        def fused_call():
            return fused(x)

    def step(fn):
        if not training:
            def run():
                with torch.no_grad():
                    fn()
            return run

        def run():
            fn().backward(grad)
        return run

    return step(eager), step(fused_call)


def op_table(batches, repeats) -> list[str]:
    lines = [f"{'op':<14} {'mode':<5} {'N':>2} {'Cin':>4} {'oup':>4} {'HxW':>7} {'eager ms':>9} {'cpu ms':>8} "
             f"{'speedup':>8}"]
    for training in (False, True):
        for batch in batches:
            totals = {}
            for op in ("ghost_concat", "dfc_attention", "ghost_attn"):
                total_eager = total_fused = 0.0
                for cin, oup, size, count in ATTN_SHAPES:
                    eager, fused = op_calls(op, cin, oup, size, batch, training)
                    t = side_by_side({"eager": eager, "cpu": fused}, repeats)
                    total_eager += count * t["eager"]
                    total_fused += count * t["cpu"]
                    lines.append(f"{op:<14} {'train' if training else 'eval':<5} {batch:>2} {cin:>4} {oup:>4} "
                                 f"{size:>3}x{size:<3} {t['eager'] * 1e3:>9.3f} {t['cpu'] * 1e3:>8.3f} "
                                 f"{t['eager'] / t['cpu']:>7.2f}x")
                totals[op] = (total_eager, total_fused)
            for op, (e, f) in totals.items():
                lines.append(f"{op:<14} {'train' if training else 'eval':<5} {batch:>2} {'all 14 attn modules':>18} "
                             f"{e * 1e3:>9.3f} {f * 1e3:>8.3f} {e / f:>7.2f}x   <- model-weighted")
    return lines


# (C, k, H, stride) of the depthwise convolution + BatchNorm pairs of ghostnetv2_100 at 224x224: the four bottlenecks'
# conv_dw + bn_dw, then the five shortcuts' first two layers.
DEPTHWISE_SHAPES = [(48, 3, 112, 2), (72, 5, 56, 2), (240, 3, 28, 2), (672, 5, 14, 2), (16, 3, 112, 2),
                    (24, 5, 56, 2), (40, 3, 28, 2), (80, 3, 14, 1), (112, 5, 14, 2)]


def depthwise_table(batches, repeats) -> list[str]:
    """ops.depthwise_bn on the cpu backend against eager Conv2d + BatchNorm2d (NCHW), eval and train (forward +
    backward), every pair of the model, and their sum."""
    lines = [f"{'depthwise_bn':<12} {'mode':<5} {'N':>2} {'C':>4} {'k':>2} {'s':>2} {'HxW':>7} {'eager ms':>9} "
             f"{'cpu ms':>8} {'speedup':>8}"]
    for training in (False, True):
        mode = "train" if training else "eval"
        for batch in batches:
            total = {"eager": 0.0, "cpu": 0.0}
            for c, k, size, stride in DEPTHWISE_SHAPES:
                conv = torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)
                bn = randomize_batch_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(c)))[0].train(training)
                x = torch.randn(batch, c, size, size, requires_grad=training)
                out_size = (size - 1) // stride + 1
                grad = torch.randn(batch, c, out_size, out_size)

                def run(fn):
                    if training:
                        return lambda: fn().backward(grad)

                    def no_grad():
                        with torch.no_grad():
                            fn()
                    return no_grad

                t = side_by_side({
                    "eager": run(lambda: bn(conv(x))),
                    "cpu": run(lambda: ops.depthwise_bn(x, conv.weight, bn, stride, training=training, backend="cpu")),
                }, repeats)
                for name in total:
                    total[name] += t[name]
                lines.append(f"{'':<12} {mode:<5} {batch:>2} {c:>4} {k:>2} {stride:>2} {size:>3}x{size:<3} "
                             f"{t['eager'] * 1e3:>9.3f} {t['cpu'] * 1e3:>8.3f} {t['eager'] / t['cpu']:>7.2f}x")
            lines.append(f"{'':<12} {mode:<5} {batch:>2} {'all 9 pairs of the model':>24} "
                         f"{total['eager'] * 1e3:>9.3f} {total['cpu'] * 1e3:>8.3f} "
                         f"{total['eager'] / total['cpu']:>7.2f}x")
    return lines + depthwise_model_table(repeats)


def depthwise_model_table(repeats) -> list[str]:
    """The fused ghostnetv2_100 (cpu backend) with its depthwise pairs fused against the same model computing them
    with the layers (the bottlenecks' and shortcuts' backend set to eager), interleaved: what the op is worth in the
    model, where its inputs arrive from the kernels before it."""
    fused = randomize_batch_norms(ghostnetv2(1.0, backend="cpu"))
    layers = copy.deepcopy(fused)
    for module in layers.modules():
        if isinstance(module, (ghostfused.nn.GhostBottleneckV2, ghostfused.nn.DepthwiseBNSequential)):
            module.backend = "eager"
    lines = [f"{'model (cpu backend)':<22} {'pairs fused ms':>15} {'layers ms':>10} {'speedup':>8}"]
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)

        def infer(model):
            def run():
                with torch.no_grad():
                    model.eval()(x)
            return run

        t = side_by_side({"fused": infer(fused), "layers": infer(layers)}, repeats)
        lines.append(f"{f'inference batch {batch}':<22} {t['fused'] * 1e3:>15.2f} {t['layers'] * 1e3:>10.2f} "
                     f"{t['layers'] / t['fused']:>7.2f}x")
    x, target = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    t = side_by_side({"fused": training_step(fused.train(), x, target),
                      "layers": training_step(layers.train(), x, target)}, max(5, repeats // 2))
    lines.append(f"{'training step batch 8':<22} {t['fused'] * 1e3:>15.2f} {t['layers'] * 1e3:>10.2f} "
                 f"{t['layers'] / t['fused']:>7.2f}x")
    return lines


def overhead_table(repeats) -> list[str]:
    """The fused module and the public op against the raw C++ kernel at batch 1, eval: the cost of the Python path
    (module forward, validation, custom-op dispatch and autograd wrapper). The kernel is called both ways: through
    the extension's Python entry point (``ghostfused._C``, what the backends call) and through ``torch.ops``, which
    boxes the arguments for the dispatcher."""
    ext = ghostfused.backends.extension()  # loading it registers torch.ops.ghostfused_C
    lines = [f"{'op':<12} {'shape':<14} {'module us':>10} {'public op us':>13} {'entry point us':>15} "
             f"{'torch.ops us':>13} {'python path us':>15}"]
    for cin, oup, size, _ in ATTN_SHAPES:
        module = randomize_batch_norms(reference.GhostModuleV2(cin, oup, mode="attn")).eval()
        fused = ghostfused.convert(copy.deepcopy(module), backend="cpu")
        p, c, s = module.primary_conv, module.cheap_operation, module.short_conv
        x = torch.randn(1, cin, size, size)
        bns = [p[1], c[1], s[1], s[3], s[5]]
        lists = ([b.weight for b in bns], [b.bias for b in bns], [b.running_mean for b in bns],
                 [b.running_var for b in bns], [b.eps for b in bns])
        args = (x, p[0].weight, c[0].weight, s[0].weight, s[2].weight, s[4].weight, *lists, oup, True, "nearest",
                False, None)

        def public():
            with torch.no_grad():
                ops.ghost_attn(x, p[0].weight, p[1], c[0].weight, c[1], s[0].weight, s[1], s[2].weight, s[3],
                               s[4].weight, s[5], oup, backend="cpu")

        def entry_point():
            with torch.no_grad():
                ext.ghost_attn_forward(*args)

        def boxed():
            with torch.no_grad():
                torch.ops.ghostfused_C.ghost_attn_forward(*args)

        def fused_module():
            with torch.no_grad():
                fused(x)

        t = side_by_side({"module": fused_module, "public": public, "entry": entry_point, "boxed": boxed},
                         repeats * 4)
        lines.append(f"{'ghost_attn':<12} {f'{cin}->{oup} {size}x{size}':<14} {t['module'] * 1e6:>10.1f} "
                     f"{t['public'] * 1e6:>13.1f} {t['entry'] * 1e6:>15.1f} {t['boxed'] * 1e6:>13.1f} "
                     f"{(t['module'] - t['entry']) * 1e6:>15.1f}")
    return lines


def onnx_runtime_session(model, batch: int, threads: int):
    """An ONNX Runtime session of ``model`` (eval) exported at ``batch`` with the legacy exporter, or None when
    onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(batch, 3, 224, 224),), buffer, dynamo=False, input_names=["x"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ONNX Runtime's workers spin for a while after each run by default: interleaved with the other calls, they
    # competed for the two cores with the call after them (eager at batch 1 measured 37-40 ms, against 16-24 ms
    # without the session running).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def model_table(repeats) -> list[str]:
    """ghostnetv2_100 inference (batch 1 and 8) and a training step (batch 8), interleaved: eager PyTorch in NCHW
    (the baseline of every ratio) and in channels_last (-cl), the fused cpu backend in both layouts, and (inference)
    ONNX Runtime running the exported eager model."""
    eager = randomize_batch_norms(ghostnetv2(1.0, backend=None))
    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fused = ghostfused.convert(copy.deepcopy(eager), backend="cpu")
    fused_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    names = ["eager", "eager-cl", "cpu", "cpu-cl", "onnxruntime"]
    lines = [f"{'model':<22}" + "".join(f"{name + ' ms':>16}" for name in names)
             + "".join(f"{name + ' x':>14}" for name in names[1:])]

    def row(label, t):
        ms = "".join(f"{t[n] * 1e3:>16.2f}" if n in t else f"{'-':>16}" for n in names)
        ratios = "".join(f"{t['eager'] / t[n]:>13.2f}x" if n in t else f"{'-':>14}" for n in names[1:])
        return f"{label:<22}{ms}{ratios}"

    for model in (eager, eager_cl, fused, fused_cl):
        model.eval()
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def infer(model, inp):
            def run():
                with torch.no_grad():
                    model(inp)
            return run

        calls = {"eager": infer(eager, x), "eager-cl": infer(eager_cl, x_cl), "cpu": infer(fused, x),
                 "cpu-cl": infer(fused_cl, x_cl)}
        session = onnx_runtime_session(eager, batch, torch.get_num_threads())
        if session is not None:
            feed = {"x": x.numpy()}
            calls["onnxruntime"] = lambda: session.run(None, feed)
        lines.append(row(f"inference batch {batch}", side_by_side(calls, repeats)))
    x = torch.randn(8, 3, 224, 224)
    target = torch.randint(0, 1000, (8,))

    for model in (eager, eager_cl, fused, fused_cl):
        model.train()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    calls = {"eager": training_step(eager, x, target), "eager-cl": training_step(eager_cl, x_cl, target),
             "cpu": training_step(fused, x, target), "cpu-cl": training_step(fused_cl, x_cl, target)}
    lines.append(row("training step batch 8", side_by_side(calls, max(3, repeats // 2))))
    return lines


def fault_measurements(providers, repeats) -> dict:
    """ghostnetv2_100 run by ``providers`` ('eager', 'cpu') interleaved: {phase: {provider: (median ms, mean minor
    page faults per call)}} for inference at batch 1 and 8 and a training step. A minor fault is a page the kernel
    maps anew (zeroed on first touch)."""
    eager = randomize_batch_norms(ghostnetv2(1.0, backend=None))
    models = {"eager": eager, "cpu": ghostfused.convert(copy.deepcopy(eager), backend="cpu")}
    models = {name: models[name] for name in providers}
    x8, target = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))

    def inference(model, x):
        def run():
            with torch.no_grad():
                model(x)
        return run

    phases = [(f"inference batch {batch}", False, {k: inference(m, x) for k, m in models.items()})
              for batch, x in ((1, torch.randn(1, 3, 224, 224)), (8, x8))]
    phases.append(("training step batch 8", True, {k: training_step(m, x8, target) for k, m in models.items()}))
    results = {}
    for name, training, calls in phases:
        for model in models.values():
            model.train(training)
        for fn in calls.values():
            fn()
        times, faults = {k: [] for k in calls}, {k: 0 for k in calls}
        for _ in range(repeats):
            for key, fn in calls.items():
                before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, CLOCK()
                fn()
                times[key].append(CLOCK() - start)
                faults[key] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        results[name] = {k: (statistics.median(times[k]) * 1e3, faults[k] / repeats) for k in calls}
    return results


def fault_lines(results) -> list[str]:
    lines = [f"{'phase':<22} {'eager ms':>9} {'cpu ms':>8} {'speedup':>8} {'eager faults':>13} {'cpu faults':>11}"]
    for name, r in results.items():
        (eager_ms, eager_faults), (cpu_ms, cpu_faults) = r["eager"], r["cpu"]
        lines.append(f"{name:<22} {eager_ms:>9.2f} {cpu_ms:>8.2f} {eager_ms / cpu_ms:>7.2f}x {eager_faults:>13.0f} "
                     f"{cpu_faults:>11.0f}")
    return lines


def fault_table(repeats) -> list[str]:
    """Eager and the fused model interleaved in this process: ms and minor page faults per call."""
    return ["interleaved in one process:"] + fault_lines(fault_measurements(("eager", "cpu"), repeats))


def alone_table(repeats, rounds: int = 3) -> list[str]:
    """Eager and the fused model each in a process of its own, alternating ``rounds`` times: interleaved in one
    process, each model's frees move glibc's mmap threshold, and so the page faults, of the other. Per round the
    medians of each process; the last line the medians over the rounds."""
    lines = []
    runs = []
    for round_ in range(rounds):
        result = {}
        for provider in ("eager", "cpu"):
            command = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--repeats",
                       str(repeats), "--no-ops", "--alone-child", provider]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            for phase, value in json.loads(child.stdout.strip().splitlines()[-1]).items():
                result.setdefault(phase, {})[provider] = value[provider]
        runs.append(result)
        lines += [f"each alone, round {round_ + 1}:"] + fault_lines(result)
    median = {phase: {p: tuple(statistics.median(run[phase][p][i] for run in runs) for i in range(2))
                      for p in ("eager", "cpu")} for phase in runs[0]}
    return lines + [f"each alone, medians over the {rounds} rounds:"] + fault_lines(median)


def profile_table(repeats) -> list[str]:
    """Where the fused model's time goes (torch.profiler, ghostnetv2_100 on the cpu backend): inference at batch 1
    and 8 and a training step at batch 8, split into the fused kernels' own work, the GEMMs they call (their 1x1
    convolutions) and everything else (the unfused layers, autograd, the Python path)."""
    model = randomize_batch_norms(ghostnetv2(1.0, backend="cpu"))
    target = torch.randint(0, 1000, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(8, 3, 224, 224)), target).backward()
        optimizer.step()

    def inference(batch):
        x = torch.randn(batch, 3, 224, 224)

        def run():
            with torch.no_grad():
                model(x)
        return run

    lines = [f"{'phase':<22} {'ms/iter':>8} {'fused kernels':>14} {'their GEMMs':>12} {'everything else':>16}"]
    for name, training, run in (("inference batch 1", False, inference(1)), ("inference batch 8", False, inference(8)),
                                ("training step batch 8", True, train_step)):
        model.train(training)
        iters = max(3, repeats // 3)
        run()
        with torch.profiler.profile() as prof:
            start = CLOCK()
            for _ in range(iters):
                run()
            total = (CLOCK() - start) / iters
        kernels = [e for e in prof.key_averages() if e.key.startswith("ghostfused_C::")]
        fused_total = sum(e.cpu_time_total for e in kernels) / iters * 1e-6
        fused_self = sum(e.self_cpu_time_total for e in kernels) / iters * 1e-6
        gemms = fused_total - fused_self
        lines.append(f"{name:<22} {total * 1e3:>8.2f} {fused_self * 1e3:>11.2f} ms {gemms * 1e3:>9.2f} ms "
                     f"{(total - fused_total) * 1e3:>13.2f} ms")
    lines.append("(wall time under the profiler, which adds its own cost to every op; the split is what to read)")
    return lines


# (Cin, Cout, H) of 1x1 convolutions of ghostnetv2_100 at 224x224: the primary convolutions of the first two
# 'original' Ghost modules (16 -> 16 and 16 -> 48 at 112x112), and of every 'attn' module with its DFC convolution at
# quarter resolution (the backward runs them transposed).
GEMM_SHAPES = sorted({(16, 8, 112), (16, 24, 112)} | {shape for cin, oup, size, _ in ATTN_SHAPES
                                                     for shape in ((cin, (oup + 1) // 2, size), (cin, oup, size // 2))})


def gemm_table(repeats) -> list[str]:
    """The 1x1 convolution choices, one call each, medians: bmm over the batch (csrc/cpu/common.cpp conv1x1) against
    oneDNN's NCHW convolution at the current thread count, whether oneDNN's result is bitwise the same at 1 and 2
    threads, and oneDNN single-threaded (what a fixed split of the batch between threads, each running oneDNN on
    its share alone, would cost per share of the work); and, single-threaded as pixels_gemm runs them, the two
    orientations of one GEMM over NHWC pixels."""
    threads = torch.get_num_threads()
    lines = [f"{'N':>2} {'Cin':>4} {'Cout':>5} {'HxW':>7} {'bmm us':>8} {'oneDNN us':>10} {'oneDNN/bmm':>11} "
             f"{'oneDNN same 1|2 thr':>20} {'oneDNN us (1 thr)':>18} {'W@P^T us (1 thr)':>17} "
             f"{'P@W^T us (1 thr)':>17}"]
    for batch in (1, 8):
        for forward in (True, False):
            for cin, cout, size in GEMM_SHAPES:
                if not forward:
                    cin, cout = cout, cin
                x = torch.randn(batch, cin, size, size)
                weight = torch.randn(cout, cin, 1, 1)
                rows, w2 = x.view(batch, cin, size * size), weight.view(cout, cin)
                out = torch.empty(batch, cout, size * size)
                t = side_by_side({"bmm": lambda: torch.bmm(w2.expand(batch, cout, cin), rows, out=out),
                                  "onednn": lambda: F.conv2d(x, weight)}, repeats)
                torch.set_num_threads(1)
                one = F.conv2d(x, weight)
                pixels = x.permute(0, 2, 3, 1).reshape(-1, cin).contiguous()
                single = side_by_side({"w_pt": lambda: torch.mm(w2, pixels.t()),
                                       "p_wt": lambda: torch.mm(pixels, w2.t()),
                                       "onednn": lambda: F.conv2d(x, weight)}, repeats)
                torch.set_num_threads(2)
                same = torch.equal(one, F.conv2d(x, weight))
                torch.set_num_threads(threads)
                lines.append(f"{batch:>2} {cin:>4} {cout:>5} {size:>3}x{size:<3} {t['bmm'] * 1e6:>8.0f} "
                             f"{t['onednn'] * 1e6:>10.0f} {t['onednn'] / t['bmm']:>10.2f}x {str(same):>20} "
                             f"{single['onednn'] * 1e6:>18.0f} {single['w_pt'] * 1e6:>17.0f} "
                             f"{single['p_wt'] * 1e6:>17.0f}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--overhead", action="store_true", help="time the Python path around the kernels")
    parser.add_argument("--model", action="store_true", help="also time ghostnetv2_100 inference and training")
    parser.add_argument("--profile", action="store_true",
                        help="split the fused model's time into fused kernels, their GEMMs and the rest")
    parser.add_argument("--faults", action="store_true",
                        help="minor page faults per call of eager and the fused model (the block cache's effect)")
    parser.add_argument("--alone", action="store_true",
                        help="eager and the fused model timed each in a process of its own, with page faults")
    parser.add_argument("--alone-child", choices=("eager", "cpu"), help=argparse.SUPPRESS)
    parser.add_argument("--gemm", action="store_true",
                        help="the 1x1 convolutions: bmm against oneDNN, and the two NHWC GEMM orientations")
    parser.add_argument("--depthwise", action="store_true",
                        help="the depthwise convolution + BatchNorm pairs (ops.depthwise_bn) against eager")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process CPU time (needs --threads 1)")
    args = parser.parse_args()
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time needs --threads 1")
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.alone_child:  # one provider's measurements for --alone, as JSON
        print(json.dumps(fault_measurements((args.alone_child,), args.repeats)))
        return
    clock = "process CPU time" if args.cpu_time else "wall time"
    env = environment(torch.device("cpu"))
    print(f"# {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, ghostfused "
          f"{env['ghostfused']} (commit {(env['git_commit'] or 'unknown')[:7]}"
          f"{', uncommitted changes to ' + ', '.join(env['uncommitted_code']) if env['uncommitted_code'] else ''}), "
          f"{env['cpu']} ({env['cpu_count']} "
          f"vCPUs), load {env['load_average']}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, medians of {args.repeats} "
          f"interleaved runs ({clock}); allocator environment: "
          f"{env['allocator_environment'] or 'none (glibc malloc defaults)'}")
    if not args.no_ops:
        print("\n".join(op_table(args.batch, args.repeats)))
    if args.depthwise:
        print("\n".join(depthwise_table(args.batch, args.repeats)))
    if args.overhead:
        print("\n".join(overhead_table(args.repeats)))
    if args.model:
        print("\n".join(model_table(args.repeats)))
    if args.profile:
        print("\n".join(profile_table(args.repeats)))
    if args.faults:
        print("\n".join(fault_table(args.repeats)))
    if args.alone:
        print("\n".join(alone_table(args.repeats)))
    if args.gemm:
        print("\n".join(gemm_table(args.repeats)))


if __name__ == "__main__":
    main()
