"""The cuda backend's kernels and glue, run on the CPU in the host emulation of the CUDA runtime
(tests/cuda_emulation), against the eager reference: the same .cu sources a GPU build compiles, so their index maps,
both layouts, reductions (chunking, block trees, warp shuffles), dtype conversions, the glue's GEMMs (no layout
copies) and its SyncBatchNorm reductions (two gloo processes) are checked without a GPU. Outputs are NaN-poisoned
before the kernels write them. On a GPU machine (a CUDA build of the extension) these are skipped: tests/test_ops.py
and the other suites run the real kernels there."""

import contextlib
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import assume, given, strategies as st

from ghostfused import backends

import cuda_emulation
from helpers import (NOTHING_SAVED, OP_CASES, assert_close, bn_index, case_arguments, compare_op_with_reference,
                     free_port, full_size_copies, op_arguments)
from reliability_helpers import LAYOUTS, with_layout

pytestmark = [
    pytest.mark.skipif(backends.extension() is None, reason="the C++ extension is not built"),
    # The emulated library registers for the CUDA key, where a CUDA build's real kernels are.
    pytest.mark.skipif(backends.extension() is not None and backends.extension().built_with_cuda(),
                       reason="the extension has the real CUDA kernels: the GPU suites run them"),
]

OPS = ["ghost_attn", "dfc_attention", "ghost_concat"]


@pytest.fixture(scope="module", autouse=True)
def emulated_cuda_backend():
    cuda_emulation.load()


def raw(op, direction):
    return lambda *args: cuda_emulation.call(f"{op}_{direction}", *args)


def forward(op):
    return lambda *args: raw(op, "forward")(*args)[:3]


def backward(op):
    return lambda grad, *args: raw(op, "backward")(grad, NOTHING_SAVED, *args)


def compare(op, args, dtype, scale=1.0):
    compare_op_with_reference(op, args, dtype, forward(op), backward(op), scale)


@contextlib.contextmanager
def reversed_thread_order():
    torch.ops.ghostfused_emulation.set_reverse_order(True)
    try:
        yield
    finally:
        torch.ops.ghostfused_emulation.set_reverse_order(False)


def test_emulation_runs_blocks_as_cuda_does():
    """The emulation's own semantics: warp shuffles (lanes past the warp keep their value), a barrier that orders
    shared-memory writes before reads, the fixed-order block reduction, a barrier some threads never reach failing
    the launch instead of hanging, and a read without a barrier whose result depends on the thread order."""
    threads = 256
    lane = torch.arange(threads, dtype=torch.float64)
    out, error = torch.ops.ghostfused_emulation.self_test("shuffle")
    assert error.item() == 0 and torch.equal(out, torch.where(lane % 32 + 5 < 32, lane + 5, lane))
    out, error = torch.ops.ghostfused_emulation.self_test("barrier")
    assert error.item() == 0 and torch.equal(out, threads - 1 - lane)
    out, error = torch.ops.ghostfused_emulation.self_test("block_sum")
    assert error.item() == 0 and out[0].item() == threads * (threads + 1) / 2
    out, error = torch.ops.ghostfused_emulation.self_test("missed_barrier")
    assert error.item() != 0
    # A read of another thread's write without a barrier: what it sees depends on the order the threads run in.
    first_to_last = torch.ops.ghostfused_emulation.self_test("race")[0] % threads
    with reversed_thread_order():
        last_to_first = torch.ops.ghostfused_emulation.self_test("race")[0] % threads
    assert torch.equal(last_to_first, (lane + 1) % threads) and not torch.equal(first_to_last, last_to_first)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_kernels_are_race_free_in_either_thread_order(op, channels_last, training):
    """Every result bitwise equal whether a block's threads run first to last or last to first between barriers:
    no thread reads another's write without a barrier between them, and the reductions' order is fixed."""
    args = op_arguments(op, 3, 4, 5, 38, 41, training, channels_last=channels_last, device="cpu")
    grad = torch.randn(3, 5, 38, 41, dtype=torch.float64)

    def run():
        out, mean, var, saved = raw(op, "forward")(*args)
        return (out, mean, var, *raw(op, "backward")(grad, saved, *args))

    expected = run()
    with reversed_thread_order():
        actual = run()
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"result {i} depends on the order of the threads"


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


@given(op=st.sampled_from(OPS), n=st.integers(1, 3), cin=st.integers(1, 12), oup=st.integers(1, 12),
       height=st.integers(2, 17), width=st.integers(2, 17), training=st.booleans(),
       k=st.sampled_from([1, 3, 5, 7]), dw=st.sampled_from([1, 3, 5]), ratio=st.sampled_from([2, 3]),
       relu=st.booleans(), upsample=st.sampled_from(["nearest", "bilinear"]), x_layout=st.sampled_from(LAYOUTS),
       features_layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1))
def test_random_configurations(op, n, cin, oup, height, width, training, k, dw, ratio, relu, upsample, x_layout,
                               features_layout, seed):
    """Property test (the hypothesis profile's examples): any op, sizes, kernel sizes, ratio, ReLU, upsampling and
    input layouts (dense, channels_last, a non-dense view) against eager in float64."""
    assume(not (training and op != "ghost_concat" and n * (height // 2) * (width // 2) == 1))  # eager refuses
    torch.manual_seed(seed)
    args = op_arguments(op, n, cin, oup, height, width, training, k=k, dw=dw, ratio=ratio, relu=relu,
                        upsample=upsample, device="cpu")
    args[0] = with_layout(args[0], x_layout)
    if op == "dfc_attention":
        args[1] = with_layout(args[1], features_layout)
    compare(op, args, torch.float64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_reductions_over_several_chunks(op, channels_last):
    """More values per channel than one reduction chunk (1024) at full and at quarter resolution."""
    compare(op, op_arguments(op, 3, 4, 5, 38, 41, True, channels_last=channels_last, device="cpu"), torch.float64)


@pytest.mark.parametrize("op", ["ghost_attn", "ghost_concat"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_more_channels_than_a_block(op, channels_last):
    """265 primary and cheap channels: in NHWC the reductions' threads are channels, two groups of 256."""
    compare(op, op_arguments(op, 2, 3, 530, 3, 5, True, channels_last=channels_last, device="cpu"), torch.float64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(op, training):
    args = op_arguments(op, 0, 3, 4, 4, 5, training, device="cpu")
    out, mean, var, _ = cuda_emulation.call(f"{op}_forward", *args)
    ref_out, ref_mean, ref_var, _ = backends.implementation("eager", op).forward(*args)
    assert out.shape == ref_out.shape
    torch.testing.assert_close((mean, var), (ref_mean, ref_var), equal_nan=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_features_not_aligned_to_a_vector(channels_last):
    """A dense features view that starts one element into its storage: the 16-byte vector path would read it
    misaligned, so the scalar one runs (float32, 8 channels and width 8: vectorisable by shape)."""
    args = op_arguments("dfc_attention", 2, 3, 8, 6, 8, True, dtype=torch.float32, channels_last=channels_last,
                        device="cpu")
    features = args[1]
    storage = torch.empty(features.numel() + 1, dtype=features.dtype)[1:]
    shifted = storage.view(2, 6, 8, 8).permute(0, 3, 1, 2) if channels_last else storage.view(features.shape)
    args[1] = shifted.copy_(features)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert args[1].data_ptr() % 16 != 0 and args[1].is_contiguous(memory_format=layout)
    compare("dfc_attention", args, torch.float32)


def test_inputs_with_other_strides():
    args = op_arguments("ghost_attn", 2, 3, 4, 10, 6, True, device="cpu")
    args[0] = args[0][:, :, ::2]
    compare("ghost_attn", args, torch.float64)
    args = op_arguments("dfc_attention", 2, 3, 4, 5, 6, True, device="cpu")
    args[1] = args[1].contiguous(memory_format=torch.channels_last)
    compare("dfc_attention", args, torch.float64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
def test_glue_makes_no_layout_copy(op, training, channels_last):
    """No tensor of full resolution is copied between the glue's kernels and GEMMs, in either layout: x, features
    and grad_out read where they are (NHWC kernels and GEMMs over all pixels for channels_last), the output and the
    input gradients written in x's layout. (A grad_out in the other layout is converted, and that copy is found.)"""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    args = op_arguments(op, 2, 5, 7, 9, 6, training, dtype=torch.float32, channels_last=channels_last, device="cpu")
    copies, results = full_size_copies(op, args, layout, raw(op, "forward"), raw(op, "backward"))
    assert copies == []
    assert all(t.is_contiguous(memory_format=layout) for t in results), "a result is not in x's layout"
    other = torch.contiguous_format if channels_last else torch.channels_last
    assert full_size_copies(op, args, other, raw(op, "forward"), raw(op, "backward"))[0] != []


SYNC_SHARDS = (slice(0, 3), slice(3, 5))  # a global batch of 5 over two processes



def _synchronised_op(rank: int, port: int, op: str, channels_last: bool):
    """One process of two (gloo): the op on this process's shard with sync_group, against eager on the global batch:
    output rows, statistics, input gradients, and parameter gradients summed over the processes."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cuda_emulation.load()
        torch.manual_seed(0)
        args = op_arguments(op, 5, 3, 5, 7, 6, True, device="cpu", channels_last=channels_last)
        grad = torch.randn(5, 5, 7, 6, dtype=torch.float64)
        shard, inputs = SYNC_SHARDS[rank], 2 if op == "dfc_attention" else 1
        local = [a[shard] if i < inputs else a for i, a in enumerate(args[:-1])] + [dist.group.WORLD.group_name]
        eager = backends.implementation("eager", op)
        out, mean, var, _ = cuda_emulation.call(f"{op}_forward", *local)
        ref_out, ref_mean, ref_var, _ = eager.forward(*args)
        assert_close(out, ref_out[shard], torch.float64, f"rank {rank}: output")
        assert_close(mean, ref_mean, torch.float64, f"rank {rank}: stats_mean")
        assert_close(var, ref_var, torch.float64, f"rank {rank}: stats_var")
        b = bn_index(op)
        sizes = [w.shape[0] for w in args[b]]
        for a in (args, local):
            a[b + 2], a[b + 3] = list(ref_mean.split(sizes)), list(ref_var.split(sizes))
        actual = cuda_emulation.call(f"{op}_backward", grad[shard], NOTHING_SAVED, *local)
        expected = eager.backward(grad, NOTHING_SAVED, *args)
        for i, (a, e) in enumerate(zip(actual, expected)):
            if i < inputs:
                assert_close(a, e[shard], torch.float64, f"rank {rank}: input gradient {i}")
            else:
                dist.all_reduce(a)
                assert_close(a, e, torch.float64, f"rank {rank}: parameter gradient {i}, summed")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_sync_batch_norm_matches_the_global_batch(op, channels_last):
    """The glue's SyncGroup path: BatchNorm statistics and backward sums reduced over two gloo processes."""
    cuda_emulation.load()  # built before the processes start
    mp.spawn(_synchronised_op, args=(free_port(), op, channels_last), nprocs=2, join=True)
