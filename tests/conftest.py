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
