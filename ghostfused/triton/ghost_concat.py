"""Triton ``ghost_concat``: the 'original' Ghost module, ``cat(act(bn(conv1x1(x))), act(bn(dwconv(.))))[:, :oup]``.

Kernels are in :mod:`.stages`. Full-resolution traffic is counted in tensors read (R) or written (W) once per
kernel (x: Cin channels, y1 / dpre1: init, y2 / dpre2: new, out / grad_out: oup; the depthwise halo is re-read from
cache, not counted). Eager figures are ATen operations traced on CPU (one or more CUDA kernels each; views and
allocations not counted).

=================  ================================================  ==============================================
                   triton                                            eager
=================  ================================================  ==============================================
eval forward       2 launches (+2 ``torch.cat`` of the running       7 ops: conv, BN, ReLU, dwconv, BN, ReLU, cat;
                   statistics): ``_project`` R x W y1, ``_write``    7 R + 7 W
                   R y1 W out; 2 R + 2 W
train forward      5: ``_project`` (+ y1 moments), finalize,         7 ops (+2 counters); BN reads its input twice:
                   ``_cheap_moments`` R y1 (y2 recomputed later,     9 R + 7 W
                   never stored), finalize, ``_write``; 3 R + 2 W
backward           8: ``_project`` (recompute y1), ``_write_grad``   7 ops: ReLU', BN', conv' (input and weight),
                   (cheap channels: R y1, grad_out; W dpre2, y2),    add, ReLU', BN', conv'; about 16 R + 7 W
                   sum, ``_cheap_grad`` (R y1, grad_out, dpre2, y2;
                   W dpre1), sum, ``_project_grad`` (R dpre1, y1;
                   W dx), ``_project_weight_grad`` (R x, dpre1, y1),
                   sum; train 12 R + 5 W, eval 9 R + 4 W (no y2)
=================  ================================================  ==============================================

The output is written once, each branch straight into its channel range. y1 is the one stored intermediate of the
forward (the 3x3 depthwise conv needs y1's neighbours across tiles); y2 is recomputed rather than stored.

1x1 convolutions: ``tl.dot`` inside the fused kernels, not a library GEMM, chosen by counting bytes per module shape
of ghostnetv2_100 (see :mod:`.stages`); not yet measured on a GPU.
"""

from . import stages


def _ghost(primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu):
    primary_bn, cheap_bn = stages.batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps)
    return stages.Ghost(primary_weight, cheap_weight, oup, relu, primary_bn, cheap_bn)


def forward(x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu, training,
            sync_group):
    """``(out [N, oup, H, W], stats_mean [init + new], stats_var [init + new])``; see ``ghostfused.reference``."""
    ghost = _ghost(primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu)
    return stages.forward(x, ghost, None, None, training, sync_group)


def backward(grad_out, x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu,
             training, sync_group):
    """``(grad_x, grad_primary_weight, grad_cheap_weight, grad_bn_weight, grad_bn_bias)``; bn_mean / bn_var are the
    statistics the forward normalised with."""
    ghost = _ghost(primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu)
    g = stages.backward(grad_out, x, ghost, None, None, training, sync_group)
    return g.x, g.primary_weight, g.cheap_weight, g.bn_weight, g.bn_bias
