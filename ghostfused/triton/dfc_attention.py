"""Triton ``dfc_attention``: ``features * upsample(sigmoid(bn(vconv(bn(hconv(bn(conv1x1(avg_pool2x2(x)))))))))``.

Kernels are in :mod:`.stages`. Full-resolution traffic is counted in tensors read (R) or written (W) once per
kernel (x: Cin channels; features, out, grad_out: C). The DFC intermediates z0, z1, z2 and their gradients live at
quarter resolution (h x w = H // 2 x W // 2), each write or read a quarter pass; the gate is computed per gate
pixel from z2 inside the output kernel and never exists at full resolution. Eager figures are ATen operations
traced on CPU (views and allocations not counted).

=================  ================================================  ==============================================
                   triton                                            eager
=================  ================================================  ==============================================
eval forward       4 launches (+2 ``torch.cat`` of the running       10 ops: pool, conv, BN, conv, BN, conv, BN,
                   statistics): ``_project`` R x (pooled in          sigmoid, upsample, mul; 3 R + 2 W (the gate is
                   registers, W z0), ``_dfc_conv`` x2, ``_write``    written and read at full resolution)
                   R features W out; 2 R + 1 W: the floor
train forward      7: the same with a finalize of the BN moments     10 ops (+3 counters); 3 R + 2 W
                   after each of the three convolutions; 2 R + 1 W
backward           12 (13 bilinear): recompute z0, z1, z2 (3),       11 ops: mul x2, upsample', sigmoid', 3 x (BN',
                   ``_write_grad`` (R grad_out, features; W          conv'), pool'; 5 R + 4 W
                   grad_features; the gate gradient summed over
                   each gate pixel's children), [``_gate_grad``],
                   sum, ``_dfc_conv_grad`` (K, 1), sum,
                   ``_dfc_conv_grad`` (1, K), sum, ``_project_grad``
                   (W dx), ``_project_weight_grad`` (R x), sum;
                   4 R + 2 W
=================  ================================================  ==============================================

1x1 convolutions: ``tl.dot`` inside the fused kernels, not a library GEMM, chosen by counting bytes per module shape
of ghostnetv2_100 (see :mod:`.stages`); not yet measured on a GPU.
"""

from . import stages


def _dfc(conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, upsample):
    bns = tuple(stages.batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps))
    return stages.Dfc(conv_weight, horizontal_weight, vertical_weight, upsample, bns)


def forward(x, features, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var,
            bn_eps, upsample, training, sync_group):
    """``(out [N, C, H, W], stats_mean [3 C], stats_var [3 C])``; see ``ghostfused.reference``."""
    dfc = _dfc(conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, upsample)
    return stages.forward(x, None, dfc, features, training, sync_group)


def backward(grad_out, x, features, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean,
             bn_var, bn_eps, upsample, training, sync_group):
    """Gradients of x, features, conv_weight, horizontal_weight, vertical_weight, then BN weight and bias."""
    dfc = _dfc(conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, upsample)
    g = stages.backward(grad_out, x, None, dfc, features, training, sync_group)
    return g.x, g.features, g.conv_weight, g.horizontal_weight, g.vertical_weight, g.bn_weight, g.bn_bias
