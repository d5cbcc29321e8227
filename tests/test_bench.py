"""The benchmark machinery of ``python -m ghostfused bench``: it runs, checks, records and reports (no timings are
asserted)."""

import json

import pytest
import torch

import ghostfused
from ghostfused import benchmark
from ghostfused.__main__ import main

from helpers import cpu_backends

TINY = dict(width=0.5, resolution=64, batch_sizes=(1, 2), train_batch_size=2, warmup=1, iters=2)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread; on a shared 2-core machine it can slow them many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fused_cpu_backends() -> list[str]:
    """The fused backends the bench would time here, plus the eager backend (the ops' dispatch path)."""
    return ["eager"] + [b for b in cpu_backends() if b not in ("eager", "triton")]


def test_bench_command_writes_json_log_and_chart(tmp_path):
    output = tmp_path / "results"
    status = main(["bench", "--device", "cpu", "--width", "0.5", "--resolution", "64", "--batch-size", "1,2",
                   "--train-batch-size", "2", "--iters", "2", "--warmup", "1", "--no-memory", "--no-progress",
                   "--backends", ",".join(fused_cpu_backends()), "--output", str(output)])
    assert status == 0
    report = json.loads((output / "bench.json").read_text())
    assert report["command"].startswith("python -m ghostfused bench --device cpu")
    environment = report["environment"]
    for key in ("device_name", "torch", "triton", "ghostfused", "threads", "available_backends", "load_average",
                "git_commit", "uncommitted_code"):
        assert key in environment, key
    # In a checkout, the package's uncommitted source files are listed (a list, empty when clean).
    assert environment["git_commit"] is None or isinstance(environment["uncommitted_code"], list)
    assert report["timestamp"] and report["config"]["batch_sizes"] == [1, 2] and not report["failures"]
    names = ["eager", "eager-ops"] + fused_cpu_backends()[1:]
    rows = {(r["provider"], r["phase"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {(n, p, b) for n in names for p, b in (("inference", 1), ("inference", 2), ("train", 2))}
    for row in rows.values():
        assert len(row["times_s"]) == 2 and row["median_s"] > 0 and row["images_per_second"] > 0
        assert row["check_error"] <= benchmark.TOLERANCES["fp32"]
    assert rows[("eager", "train", 2)]["speedup_vs_eager"] == 1.0
    log = (output / "bench.log").read_text()
    assert "ms/batch" in log and "eager-ops" in log
    pytest.importorskip("matplotlib")
    assert (output / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_a_provider_that_differs_from_eager_fails_its_check(monkeypatch):
    def broken_convert(model, backend):
        with torch.no_grad():
            model.classifier.bias.add_(1.0)
        return model

    monkeypatch.setattr(benchmark, "convert", broken_convert)
    config = benchmark.Config(torch.device("cpu"), backends=("eager",), memory=False, **TINY)
    outcome = benchmark.run(config, log=lambda line: None, progress=False)
    assert [f["provider"] for f in outcome["failures"]] == ["eager-ops"]
    assert "differ from eager" in outcome["failures"][0]["error"]
    assert {r["provider"] for r in outcome["results"]} == {"eager"}  # not timed after failing


def test_training_step_peak_memory_is_measured():
    """The CPU measurement: a fresh process per provider, peak resident set of one training step."""
    config = benchmark.Config(torch.device("cpu"), **TINY)
    memory = benchmark.measure_memory_in_subprocess(config, benchmark.Provider("eager", None, False))
    assert memory["peak_bytes"] > memory["step_bytes"] > 0
    assert "fresh process" in memory["method"]
    with pytest.raises(ValueError, match="compiled"):
        benchmark.measure_memory_in_subprocess(config, benchmark.Provider("compile", None, True))


def test_peak_memory_counters_see_an_allocation():
    device = torch.device("cpu")
    method = ghostfused.train.reset_peak_memory(device)
    if "reset" not in method:
        pytest.skip(f"the peak resident set cannot be reset here ({method})")
    before = ghostfused.train.current_memory_bytes(device)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert ghostfused.train.peak_memory_bytes(device) - before >= 60 * 2**20
    del block


def test_ghost_module_inputs_follow_the_model():
    model = ghostfused.models.ghostnetv2_100(backend=None).eval()
    found = benchmark.ghost_module_inputs(model, torch.randn(1, 3, 224, 224))
    assert len(found) == 32 and sum(m.mode == "attn" for _, m, _ in found) == 14
    assert found[0][0] == "blocks.0.0.ghost1" and found[0][2] == (1, 16, 112, 112)
    assert found[-1][2] == (1, 960, 7, 7)


def test_calibrated_model_keeps_activations_at_scale():
    config = benchmark.Config(torch.device("cpu"), **TINY)
    model = benchmark.build_model(config)
    assert not model.training
    logits = model(torch.randn(2, 3, 64, 64))
    assert 0.1 < logits.std().item() < 100
    assert all(m.num_batches_tracked.item() == 0 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_providers_and_device_defaults():
    cpu = benchmark.Config.defaults(torch.device("cpu"))
    assert cpu.batch_sizes == (1, 8) and cpu.train_batch_size == 8 and not cpu.compile and cpu.dtype == "fp32"
    assert "triton" not in benchmark.fused_backends(torch.device("cpu"))  # the interpreter is not timed
    config = benchmark.Config(torch.device("cuda"), compile=True, backends=("eager", "triton", "cuda"))
    assert [p.name for p in benchmark.providers(config)] == ["eager", "compile", "eager-ops", "triton", "cuda",
                                                              "cuda+compile"]
    assert [p.name for p in benchmark.providers(benchmark.Config(torch.device("cpu")))] == ["eager"]


def test_time_calls_warms_up_then_times_each_call():
    calls = []
    times = benchmark.time_calls(lambda: calls.append(1), torch.device("cpu"), warmup=3, iters=4)
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)


def test_time_interleaved_alternates_and_drops_a_failing_call():
    calls, errors = [], []

    def flaky():
        calls.append("b")
        if calls.count("b") == 3:
            raise RuntimeError("broken")

    times = benchmark.time_interleaved({"a": lambda: calls.append("a"), "b": flaky, "c": lambda: calls.append("c")},
                                       torch.device("cpu"), warmup=1, iters=3,
                                       on_error=lambda name, error: errors.append((name, str(error))))
    assert calls == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "c"]  # round by round; b dropped in round 3
    assert errors == [("b", "broken")] and set(times) == {"a", "c"} and all(len(t) == 3 for t in times.values())
    calls.clear()
    times = benchmark.time_interleaved({"a": lambda: calls.append("a"), "c": lambda: calls.append("c")},
                                       torch.device("cpu"), warmup=1, iters=5, block=3)
    # warm-up round, then blocks of one untimed and up to three timed calls
    assert "".join(calls) == "ac" + "aaaacccc" + "aaacc" + "c" and all(len(t) == 5 for t in times.values())
    with pytest.raises(ZeroDivisionError):  # without on_error the error propagates
        benchmark.time_interleaved({"a": lambda: 1 / 0}, torch.device("cpu"), warmup=0, iters=3)


def test_roofline_view_runs_and_reports():
    """The GPU roofline, run on CPU tensors here (the bench runs it on GPUs only): floor bytes and percentages."""
    config = benchmark.Config(torch.device("cpu"), width=0.5, resolution=64, batch_sizes=(2,))
    model = benchmark.build_model(config)
    roofline = benchmark.measure_roofline(config, model, ["eager"], log=lambda line: None, copy_bytes=1 << 22)
    modules = roofline["modules"]
    assert len(modules) == 14 and roofline["copy_bandwidth_bytes_per_s"] > 0
    first = modules[0]
    n, cin, h, w = first["input_shape"]
    assert first["floor_bytes"] == (cin + first["oup"]) * n * h * w * 4
    assert first["backends"]["eager"]["percent_of_floor"] > 0
    text = benchmark.format_roofline(roofline)
    assert "blocks.2.0.ghost1" in text and "% floor" in text


def test_chart_with_roofline(tmp_path):
    pytest.importorskip("matplotlib")
    row = {"provider": "eager", "phase": "inference", "batch_size": 1, "median_s": 0.01, "images_per_second": 100.0,
           "speedup_vs_eager": 1.0}
    roofline = {"modules": [{"module": "blocks.2.0.ghost1", "backends": {"cuda": {"percent_of_floor": 75.0}}}]}
    report = {"results": [row], "roofline": roofline, "config": {"width": 1.0, "dtype": "bf16", "resolution": 224},
              "environment": {"device_name": "test", "threads": 1}}
    assert benchmark.write_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_on_gpu(dtype):
    config = benchmark.Config(torch.device("cuda"), dtype=dtype, backends=tuple(benchmark.fused_backends(
        torch.device("cuda"))), **TINY)
    outcome = benchmark.run(config, log=lambda line: None, progress=False)
    assert not outcome["failures"], outcome["failures"]
    assert all("peak_bytes" in r["memory"] for r in outcome["results"] if r["phase"] == "train")
    assert outcome["roofline"]["modules"] and outcome["roofline"]["copy_bandwidth_bytes_per_s"] > 1e11
