"""Triton ``dfc_attention``: ``features * upsample(sigmoid(bn(vconv(bn(hconv(bn(conv1x1(avg_pool2x2(x)))))))))``.

Full-resolution passes are counted per channel of the output (``x``: Cin channels); the quarter-resolution
intermediates z0, z1, z2 (C channels at h x w) cost a quarter pass each per write or read.

* eval forward, 4 launches + 2 ``torch.cat`` [eager: ~12 launches]: ``_project`` reads x, writes z0;
  ``_dfc_conv`` twice (z1, z2); ``_write`` reads features and z2 (once per gate pixel, sigmoid computed there),
  writes out once. The gate is never materialised at full resolution.
* train forward, 7 launches: the same with a finalize of the BN moments after each of the three stages.
* backward, 10 launches + 2 ``torch.cat`` (11 with bilinear): recompute z0, z1, z2 (3); ``_write_grad`` reads
  grad_out, features, writes grad_features and the gate gradient reduced over each gate pixel's children; sum;
  ``_dfc_conv_grad`` (vertical), sum, ``_dfc_conv_grad`` (horizontal), sum; ``_project_grad`` writes dx;
  ``_project_weight_grad`` reads x; sum.
"""

from . import stages


def _dfc(conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, upsample):
    bns = tuple(stages.batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps))
    return stages.Dfc(conv_weight, horizontal_weight, vertical_weight, upsample, bns)


def forward(x, features, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var,
            bn_eps, upsample, training):
    """``(out [N, C, H, W], stats_mean [3 C], stats_var [3 C])``; see ``ghostfused.reference``."""
    dfc = _dfc(conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, upsample)
    return stages.forward(x, None, dfc, features, training)


def backward(grad_out, x, features, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean,
             bn_var, bn_eps, upsample, training):
    """Gradients of x, features, conv_weight, horizontal_weight, vertical_weight, then BN weight and bias."""
    dfc = _dfc(conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, upsample)
    g = stages.backward(grad_out, x, None, dfc, features, training)
    return g.x, g.features, g.conv_weight, g.horizontal_weight, g.vertical_weight, g.bn_weight, g.bn_bias
