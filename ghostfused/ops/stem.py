"""GhostNetV2's stem in eval mode, ``act(bn(conv(x)))``, as one pass of the ``cpu`` backend's kernel
(``csrc/cpu/stem.cpp``: a dense k x k convolution of few input channels, the BatchNorm folded into its taps, the ReLU
applied as each output is stored).

Eager's stem (oneDNN, 3 -> 16 channels, 3x3, stride 2) page-faults at every batch-8 call: its 6.4 MB output and a
reorder buffer of the same size are fresh memory each time, which glibc maps anew. The kernel writes into the
``cpu`` kernels' block cache instead: with it the fused model's minor faults per batch-8 forward, each model alone,
fell from 3569-3706 to 36-173 (``benchmarks/cpu_ops.py --faults --alone``: benchmarks/results/cpu-20261206-003924
before, cpu-20261206-022113 and cpu-20261206-022425 after). It has no backward, so it serves inference only:
training, a call that records a graph, autocast, ONNX export and torch.compile run the layers, as do the other
backends (cuDNN is fast) and channels_last inputs (oneDNN's own layout).
"""

import torch
import torch.nn as nn
from torch import Tensor

from .. import backends
from ..reference import memory_format_of
from .batch_norm import is_fusable, module_schema_lists
from .direct import kernel_call_allowed

# Taps per output (Cin * k * k) of the convolutions the direct kernel takes: the stem's 27, with room for 5x5
# kernels; wider convolutions are GEMM work, which oneDNN does well.
MAX_TAPS = 75


def stem_reason(conv: nn.Module, bn: nn.Module, act: nn.Module) -> str | None:
    """Why the kernel cannot compute ``act(bn(conv(x)))`` in eval mode (None when it can)."""
    if type(conv) is not nn.Conv2d or conv.groups != 1 or conv.padding_mode != "zeros":
        return "the convolution must be a dense nn.Conv2d (groups=1, zero padding)"
    k, stride = conv.kernel_size[0], conv.stride[0]
    if (conv.kernel_size != (k, k) or k % 2 == 0 or conv.stride != (stride, stride) or conv.dilation != (1, 1)
            or conv.padding != (k // 2, k // 2)):
        return "the convolution must have an odd square kernel k, padding k // 2, one stride and no dilation"
    if conv.in_channels * k * k > MAX_TAPS:
        return f"the convolution reads {conv.in_channels * k * k} inputs per output (the kernel takes {MAX_TAPS})"
    if not is_fusable(bn) or bn.num_features != conv.out_channels:
        return "the BatchNorm must be an affine nn.BatchNorm2d (or SyncBatchNorm) of the convolution's channels"
    if type(act) not in (nn.ReLU, nn.Identity):
        return "the activation must be nn.ReLU or nn.Identity"
    return None


def stem_kernel_output(conv: nn.Conv2d, bn: nn.Module, act: nn.Module, x: Tensor, backend: str) -> Tensor | None:
    """``act(bn(conv(x)))`` computed by the ``cpu`` kernel, or None when the layers must compute it.

    The kernel runs for an eval-mode call of the ``cpu`` backend that nothing observes (no graph recorded, no
    compiler, tracer or dispatch mode: ``unobserved``), outside autocast and ONNX export, on a dense NCHW float32 or
    float64 x, with layers :func:`stem_reason` accepts. x: ``[N, Cin, H, W]``; returns ``[N, Cout, H', W']`` in
    x's dtype, contiguous.
    """
    if (not isinstance(x, Tensor) or x.device.type != "cpu" or bn.training
            or backends.resolve(backend, x.device) != "cpu"):
        return None
    if (x.dim() != 4 or x.dtype not in (torch.float32, torch.float64)
            or memory_format_of(x) == torch.channels_last or stem_reason(conv, bn, act) is not None):
        return None
    lists = module_schema_lists([bn])
    args = (x, conv.weight, conv.bias, *lists)
    if not kernel_call_allowed(args):
        return None
    ext = backends.extension()  # after the check: under torch.compile dynamo refuses to trace its import
    return None if ext is None else ext.stem_forward(*args, conv.stride[0], type(act) is nn.ReLU)
