"""Triton ``ghost_attn``: a whole 'attn' Ghost module, ``ghost_concat(x) * upsample(dfc_gate(x))``, as one op.

The output is written once (``_write_kernel``): per gate pixel, the gate sigmoid(bn(z2)) is computed once (four
corners with bilinear) and applied to act(bn(y1)) in channels [0, init) and act(bn(dwconv(act(bn(y1))))) in
[init, oup) of each child pixel in the same store. No concatenation, slice, sigmoid, upsample or multiply runs on
its own, and the gate never exists at full resolution. One pass over x computes both 1x1 convolutions (the DFC one
on the 2x2-pooled quads, in registers).

Full-resolution traffic is counted in tensors read (R) or written (W) once per kernel (x: Cin channels; y1, dpre1:
init; dpre2, y2: new; out, grad_out: oup; the depthwise halo re-read from cache is not counted; quarter-resolution
tensors z0, z1, z2 and their gradients are extra quarter passes). Eager figures are ATen operations traced on CPU
(views and allocations not counted).

=================  ================================================  ==============================================
                   triton                                            eager
=================  ================================================  ==============================================
eval forward       4 launches (+2 ``torch.cat`` of the running       19 ops: the 7 of ghost_concat, pool, 3 x (conv,
                   statistics): ``_project`` R x W y1 (and z0),      BN), sigmoid, upsample, mul; 11 R + 9 W
                   ``_dfc_conv`` x2, ``_write`` R y1 W out;
                   2 R + 2 W
train forward      8: ``_project`` (+ moments of y1 and z0),         19 ops (+5 counters); BN reads its input twice:
                   finalize, ``_cheap_moments`` R y1, ``_dfc_conv``  13 R + 9 W
                   (1, K), finalize, ``_dfc_conv`` (K, 1),
                   finalize, ``_write``; 3 R + 2 W
backward           13 (14 bilinear): recompute y1, z0 (1), z1, z2    19 ops: mul x2, upsample', sigmoid', 3 x (BN',
                   (2), ``_write_grad`` (R y1, grad_out; W dpre2,    conv'), pool', ReLU', BN', conv', add, ReLU',
                   y2; gate gradient per gate pixel),                BN', conv', add; about 22 R + 11 W
                   [``_gate_grad``], sum, ``_cheap_grad`` (R y1,
                   grad_out, dpre2, y2; W dpre1), ``_dfc_conv_grad``
                   (K, 1), sum, ``_dfc_conv_grad`` (1, K), sum,
                   ``_project_grad`` (R dpre1, y1; W dx),
                   ``_project_weight_grad`` (R x, dpre1, y1), sum;
                   train 12 R + 5 W, eval 9 R + 4 W
=================  ================================================  ==============================================

The floor is R x + W out. The remaining forward overhead is y1 (init = oup / 2 channels) written and read back: the
cheap depthwise conv needs y1 at neighbouring pixels of other tiles, and recomputing it there costs 9 GEMMs per
pixel, which is compute-bound at 160 -> 960; plus the quarter-resolution z0, z1, z2 (6 quarter passes of oup
channels). Not measured (no GPU in this session).

1x1 convolutions: ``tl.dot`` inside the fused kernels, not a library GEMM, chosen by counting bytes per module shape
of ghostnetv2_100 (see :mod:`.stages`); not yet measured on a GPU.
"""

from . import stages


def _parts(primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias,
           bn_mean, bn_var, bn_eps, oup, relu, upsample):
    bns = stages.batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps)
    ghost = stages.Ghost(primary_weight, cheap_weight, oup, relu, bns[0], bns[1])
    return ghost, stages.Dfc(conv_weight, horizontal_weight, vertical_weight, upsample, tuple(bns[2:]))


def forward(x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias,
            bn_mean, bn_var, bn_eps, oup, relu, upsample, training, sync_group):
    """``(out [N, oup, H, W], stats_mean [init + new + 3 oup], stats_var)``; see ``ghostfused.reference``."""
    ghost, dfc = _parts(primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight,
                        bn_bias, bn_mean, bn_var, bn_eps, oup, relu, upsample)
    return stages.forward(x, ghost, dfc, None, training, sync_group)


def backward(grad_out, x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight,
             bn_bias, bn_mean, bn_var, bn_eps, oup, relu, upsample, training, sync_group):
    """Gradients of x and the five convolution weights, then BN weight and bias packed like the statistics."""
    ghost, dfc = _parts(primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight,
                        bn_bias, bn_mean, bn_var, bn_eps, oup, relu, upsample)
    g = stages.backward(grad_out, x, ghost, dfc, None, training, sync_group)
    return (g.x, g.primary_weight, g.cheap_weight, g.conv_weight, g.horizontal_weight, g.vertical_weight,
            g.bn_weight, g.bn_bias)
