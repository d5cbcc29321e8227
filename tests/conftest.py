"""Test configuration: Triton's interpreter when there is no GPU, poisoned kernel outputs, and shared fixtures.

Both variables must be set before ghostfused or any @triton.jit function is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GHOSTFUSED_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

import ghostfused  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Hypothesis profiles of the property tests (tests/test_fuzz.py). "ci", the default: few examples, derandomized (the
# same examples on every run), no deadline; "long" (`pytest --hypothesis-profile=long tests/test_fuzz.py`): many
# random examples, with failures kept in .hypothesis/ and replayed first on the next run. Hypothesis is optional (the
# GPU machines may lack it): without it test_fuzz.py skips.
try:
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    settings.register_profile("ci", max_examples=30, derandomize=True, deadline=None, database=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci")
