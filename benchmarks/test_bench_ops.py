"""Each op case, per provider: checked against float64 eager once, then timed (see conftest.py for the options)."""

import time

import torch

import op_cases


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_op(benchmark, case, provider, settings):
    device, dtype = settings.device, settings.dtype
    run = op_cases.runner(case, provider, device, dtype)
    error = op_cases.check(case, provider, run, device, dtype)  # the first call also compiles, where it does
    benchmark.group = case.group
    benchmark.extra_info.update(op=case.op, module=case.shape.module, shape=case.shape.id, provider=provider,
                                batch_size=case.batch_size, training=case.training, backward=case.backward,
                                check_error=error, dtype=str(dtype))
    if device.type == "cuda":
        median_ms = op_cases.gpu_median_ms(run)
        benchmark.extra_info["gpu_median_ms"] = median_ms

        def synchronised():
            run()
            torch.cuda.synchronize()

        benchmark.pedantic(synchronised, rounds=10, warmup_rounds=2)
    else:
        once = min(_seconds(run) for _ in range(3))
        benchmark.pedantic(run, rounds=max(3, min(200, int(settings.time_budget / max(once, 1e-6)))),
                           warmup_rounds=1)
        median_ms = benchmark.stats.stats.median * 1e3 if benchmark.stats is not None else None
    settings.rows.append({"group": case.group, "provider": provider, "median_ms": median_ms, "check_error": error}
                         | benchmark.extra_info)
