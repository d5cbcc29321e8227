"""The cuda backend's kernels and glue, run on the CPU in the host emulation of the CUDA runtime
(tests/cuda_emulation), against the eager reference: the same .cu sources a GPU build compiles, so their index maps,
layouts, reductions (chunking, block trees, warp shuffles) and dtype conversions are checked without a GPU. Outputs
are NaN-poisoned before the kernels write them. On a GPU machine tests/test_ops.py and the others run the real
thing."""

import pytest
import torch

from ghostfused import backends

import cuda_emulation
from helpers import NOTHING_SAVED, OP_CASES, case_arguments, compare_op_with_reference, op_arguments

pytestmark = pytest.mark.skipif(backends.extension() is None, reason="the C++ extension is not built")

OPS = ["ghost_attn", "dfc_attention", "ghost_concat"]


@pytest.fixture(scope="module", autouse=True)
def emulated_cuda_backend():
    cuda_emulation.load()


def forward(op):
    return lambda *args: cuda_emulation.call(f"{op}_forward", *args)[:3]


def backward(op):
    return lambda grad, *args: cuda_emulation.call(f"{op}_backward", grad, NOTHING_SAVED, *args)


def compare(op, args, dtype, scale=1.0):
    compare_op_with_reference(op, args, dtype, forward(op), backward(op), scale)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(OP_CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_matches_reference_float64(op, case, training):
    compare(op, case_arguments(op, case, training, device="cpu"), torch.float64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_matches_reference_in_lower_precision(op, dtype, channels_last, training):
    """float32 and the half types (reference: float32 on the same rounded values); width 16, a multiple of the
    16-byte vectors of both, and the smallest odd one. The half types without the ReLU: the kernels store the
    primary convolution in the dtype and the reference does not, so a pre-activation within rounding of zero may
    take the other side of the ReLU, and its gradient with it (float32 and float64 cover the ReLU)."""
    options = dict(relu=False) if dtype in (torch.float16, torch.bfloat16) and op != "dfc_attention" else {}
    for W in (16, 7):
        args = op_arguments(op, 2, 6, 9, 6, W, training, dtype=dtype, channels_last=channels_last, device="cpu",
                            upsample="bilinear", **options)
        compare(op, args, dtype)


@pytest.mark.parametrize("op", OPS)
def test_reductions_over_several_chunks(op):
    """More values per channel than one reduction chunk (1024) at full and at quarter resolution."""
    compare(op, op_arguments(op, 3, 4, 5, 38, 41, True, device="cpu"), torch.float64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(op, training):
    args = op_arguments(op, 0, 3, 4, 4, 5, training, device="cpu")
    out, mean, var, _ = cuda_emulation.call(f"{op}_forward", *args)
    ref_out, ref_mean, ref_var, _ = backends.implementation("eager", op).forward(*args)
    assert out.shape == ref_out.shape
    torch.testing.assert_close((mean, var), (ref_mean, ref_var), equal_nan=True)


def test_inputs_with_other_strides():
    args = op_arguments("ghost_attn", 2, 3, 4, 10, 6, True, device="cpu")
    args[0] = args[0][:, :, ::2]
    compare("ghost_attn", args, torch.float64)
    args = op_arguments("dfc_attention", 2, 3, 4, 5, 6, True, device="cpu")
    args[1] = args[1].contiguous(memory_format=torch.channels_last)
    compare("dfc_attention", args, torch.float64)
