"""Triton ``ghost_attn``: a whole 'attn' Ghost module, ``ghost_concat(x) * upsample(dfc_gate(x))``.
"""

from . import stages


def _parts(primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias,
           bn_mean, bn_var, bn_eps, oup, relu, upsample):
    bns = stages.batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps)
    ghost = stages.Ghost(primary_weight, cheap_weight, oup, relu, bns[0], bns[1])
    return ghost, stages.Dfc(conv_weight, horizontal_weight, vertical_weight, upsample, tuple(bns[2:]))


def forward(x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight, bn_bias,
            bn_mean, bn_var, bn_eps, oup, relu, upsample, training):
    """``(out [N, oup, H, W], stats_mean [init + new + 3 oup], stats_var)``; see ``ghostfused.reference``."""
    ghost, dfc = _parts(primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight,
                        bn_bias, bn_mean, bn_var, bn_eps, oup, relu, upsample)
    return stages.forward(x, ghost, dfc, None, training)


def backward(grad_out, x, primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight,
             bn_bias, bn_mean, bn_var, bn_eps, oup, relu, upsample, training):
    """Gradients of x and the five convolution weights, then BN weight and bias packed like the statistics."""
    ghost, dfc = _parts(primary_weight, cheap_weight, conv_weight, horizontal_weight, vertical_weight, bn_weight,
                        bn_bias, bn_mean, bn_var, bn_eps, oup, relu, upsample)
    g = stages.backward(grad_out, x, ghost, dfc, None, training)
    return (g.x, g.primary_weight, g.cheap_weight, g.conv_weight, g.horizontal_weight, g.vertical_weight,
            g.bn_weight, g.bn_bias)
