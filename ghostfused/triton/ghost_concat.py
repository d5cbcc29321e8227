"""Triton ``ghost_concat``: the 'original' Ghost module, ``cat(act(bn(conv1x1(x))), act(bn(dwconv(.))))[:, :oup]``.

Kernels (see :mod:`.stages`) and full-resolution passes, counted in tensors of the output's size per channel
(``x``: Cin channels read; ``y1``: init channels; ``out``: oup channels); eager in brackets:

* eval forward, 2 launches + 2 ``torch.cat`` of the running statistics [eager: 6 launches, ~10 passes]:
  ``_project`` reads x, writes y1; ``_write`` reads y1 (its 3x3 halo from cache) and writes out once.
* train forward, 5 launches [eager: ~12]: ``_project`` (+ y1 moments), finalize, ``_cheap_moments`` reads y1
  (y2 moments; y2 is recomputed later, not stored), finalize, ``_write``. Reads x, writes y1, reads y1 twice,
  writes out.
* backward, 7 launches + 2 ``torch.cat`` [eager: ~20]: ``_project`` recomputes y1 (reads x, writes y1);
  ``_write_grad`` reads y1 and grad_out[init:], writes dpre2 (new) and, in training, y2 (new); sum;
  ``_cheap_grad`` reads y1, grad_out[:init], dpre2, y2, writes dpre1 (init); sum; ``_project_grad`` reads dpre1, y1,
  writes dx; ``_project_weight_grad`` reads x, dpre1, y1; sum.
"""

from . import stages


def _ghost(primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu):
    primary_bn, cheap_bn = stages.batch_norms(bn_weight, bn_bias, bn_mean, bn_var, bn_eps)
    return stages.Ghost(primary_weight, cheap_weight, oup, relu, primary_bn, cheap_bn)


def forward(x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu, training):
    """``(out [N, oup, H, W], stats_mean [init + new], stats_var [init + new])``; see ``ghostfused.reference``."""
    ghost = _ghost(primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu)
    return stages.forward(x, ghost, None, None, training)


def backward(grad_out, x, primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu,
             training):
    """``(grad_x, grad_primary_weight, grad_cheap_weight, grad_bn_weight, grad_bn_bias)``; bn_mean / bn_var are the
    statistics the forward normalised with."""
    ghost = _ghost(primary_weight, cheap_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, oup, relu)
    g = stages.backward(grad_out, x, ghost, None, None, training)
    return g.x, g.primary_weight, g.cheap_weight, g.bn_weight, g.bn_bias
