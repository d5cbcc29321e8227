"""Backend registry and selection: available_backends, set_backend, use_backend, GHOSTFUSED_BACKEND, auto."""

import os
import subprocess
import sys

import pytest
import torch

import ghostfused
from ghostfused import backends


def test_eager_is_always_available():
    assert "eager" in ghostfused.available_backends()
    assert set(ghostfused.available_backends()) <= set(backends.BACKENDS)


def test_auto_picks_the_cpu_backend_for_cpu_tensors_when_built():
    expected = "cpu" if "cpu" in ghostfused.available_backends() else "eager"
    assert backends.resolve("auto", torch.device("cpu")) == expected


def test_set_and_use_backend():
    assert ghostfused.get_backend() == "auto"
    with ghostfused.use_backend("eager"):
        assert ghostfused.get_backend() == "eager"
        assert backends.resolve("auto", torch.device("cpu")) == "eager"
    assert ghostfused.get_backend() == "auto"
    ghostfused.set_backend("eager")
    try:
        assert backends.resolve("auto", torch.device("cpu")) == "eager"
    finally:
        ghostfused.set_backend("auto")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        ghostfused.set_backend("fastest")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("CUDA", torch.device("cpu"))
    with pytest.raises(TypeError, match="backend must be a string"):
        ghostfused.set_backend(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_unavailable_backend_says_why():
    with pytest.raises(ghostfused.BackendUnavailableError, match="cuda.*not available: .*(GPU|CUDA|extension)"):
        ghostfused.set_backend("cuda")


def test_backend_that_cannot_run_on_the_device():
    name = "cpu" if "cpu" in ghostfused.available_backends() else None
    if name is None:
        pytest.skip("the cpu backend is not built")
    with pytest.raises(ValueError, match="cannot run on meta tensors"):
        backends.resolve("cpu", torch.device("meta"))


def test_environment_variable_sets_the_default():
    env = dict(os.environ, GHOSTFUSED_BACKEND="eager")
    out = subprocess.run([sys.executable, "-c", "import ghostfused; print(ghostfused.get_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "eager"


def test_import_works_without_the_extension():
    """`import ghostfused` must not need ghostfused._C: eager still runs, cpu says how to build."""
    code = ("import sys; sys.modules['ghostfused._C'] = None\n"
            "import ghostfused, torch\n"
            "from ghostfused import backends\n"
            "assert 'cpu' not in ghostfused.available_backends()\n"
            "print(backends.unavailable_reason('cpu'))\n"
            "m = ghostfused.models.ghostnetv2_100(num_classes=4).eval()\n"
            "print(m(torch.randn(1, 3, 64, 64)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "not built" in out.stdout and "make test" in out.stdout
    assert "torch.Size([1, 4])" in out.stdout


def test_extension_schemas_match_the_python_ops():
    if backends.extension() is None:
        pytest.skip("the C++ extension is not built")
    for op in ("ghost_concat", "dfc_attention", "ghost_attn"):
        python = str(getattr(torch.ops.ghostfused, op).default._schema)
        native = str(getattr(torch.ops.ghostfused_C, f"{op}_forward").default._schema)
        assert python.split("(", 1)[1].replace(", str backend", "") == native.split("(", 1)[1], op
