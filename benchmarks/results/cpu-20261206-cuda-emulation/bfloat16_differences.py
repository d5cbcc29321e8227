"""The two bfloat16 gradient differences met while choosing tests/test_cuda_emulation.py's half-precision tolerances,
in the emulated cuda kernels against eager float32 on the same rounded values. Run from the repository root:
.venv/bin/python <this file>.

1. ghost_attn, training, 2 x 6 x 6 x 16 -> 9, bilinear: the largest input-gradient difference, and eager bfloat16's
   own difference from the same float32 reference at that element.
2. ghost_concat, eval, 2 x 6 x 6 x 7 -> 9 (the test's RNG stream): the comparison with the ReLU, and the cheap
   branch's ReLU mask computed from the float32 primary convolution and from the bfloat16 one the kernels store; a
   flipped position moves the gradient of the pixels that read it.
"""
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "tests")
import cuda_emulation  # noqa: E402
import test_cuda_emulation  # noqa: E402
from ghostfused import backends  # noqa: E402
from helpers import NOTHING_SAVED, _in_float32, bn_index, op_arguments  # noqa: E402

cuda_emulation.load()
eager = backends.implementation("eager", "ghost_attn")
for channels_last in (False, True):
    torch.manual_seed(0)
    args = op_arguments("ghost_attn", 2, 6, 9, 6, 16, True, dtype=torch.bfloat16, channels_last=channels_last,
                        device="cpu", upsample="bilinear")
    b = bn_index("ghost_attn")
    args[b:b + 4] = _in_float32(args[b:b + 4])
    reference = _in_float32(args)
    ref_out, ref_mean, ref_var, _ = eager.forward(*reference)
    sizes = [w.shape[0] for w in args[b]]
    grad = torch.randn_like(ref_out)
    for a in (args, reference):
        a[b + 2], a[b + 3] = list(ref_mean.split(sizes)), list(ref_var.split(sizes))
    emulated = cuda_emulation.call("ghost_attn_backward", grad.bfloat16(), NOTHING_SAVED, *args)[0].float()
    truth = eager.backward(grad, NOTHING_SAVED, *reference)[0]
    eager_bf16 = eager.backward(grad.bfloat16(), NOTHING_SAVED, *args)[0].float()
    error = (emulated - truth).abs()
    worst = tuple(int(k) for k in torch.unravel_index(error.argmax(), error.shape))
    print(f"1. channels_last={channels_last}: largest dx difference {error.max().item():.4f} at {worst} "
          f"(emulated {emulated[worst].item():.4f}, float32 {truth[worst].item():.4f}, eager bfloat16 "
          f"{eager_bf16[worst].item():.4f}); eager bfloat16's largest: {(eager_bf16 - truth).abs().max().item():.4f}")

torch.manual_seed(0)
for width in (16, 7):
    args = op_arguments("ghost_concat", 2, 6, 9, 6, width, False, dtype=torch.bfloat16, device="cpu",
                        upsample="bilinear")
    saved = list(args)
    if width == 16:
        test_cuda_emulation.compare("ghost_concat", args, torch.bfloat16)  # consumes the RNG as the test did
try:
    test_cuda_emulation.compare("ghost_concat", list(saved), torch.bfloat16)  # the test with the ReLU, as it failed
    print("2. the comparison passes")
except AssertionError as error:
    print(f"2. the comparison: {error}")
args = saved
b = bn_index("ghost_concat")
args[b:b + 4] = _in_float32(args[b:b + 4])
x, primary, cheap = args[0].float(), args[1].float(), args[2].float()


def batch_norm(y, i):
    w, bias, mean, var = (args[b + k][i][None, :, None, None] for k in range(4))
    return (y - mean) / (var + 1e-5).sqrt() * w + bias


y1 = F.conv2d(x, primary)
for name, stored in (("float32", y1), ("bfloat16", y1.bfloat16().float())):
    a1 = batch_norm(stored, 0).relu()
    pre = batch_norm(F.conv2d(a1, cheap, padding=1, groups=cheap.shape[0]), 1)
    if name == "float32":
        pre32 = pre
    else:
        flipped = (pre32 > 0) != (pre > 0)
        print(f"2. cheap ReLU positions flipped by the bfloat16 y1: {flipped.nonzero().tolist()}; pre-activation "
              f"there {pre32[flipped].tolist()} (float32 y1) and {pre[flipped].tolist()} (bfloat16 y1)")
