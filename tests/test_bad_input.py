"""SPEC section 5 through the public API: each bad input raises an exception naming the argument."""

import pytest
import torch

from ghostfused import ops

from helpers import cpu_backends, ghost_module

BACKENDS = cpu_backends()


def _attn_args(x=None, dtype=torch.float32):
    module = ghost_module(4, 6, dtype=dtype)
    p, c, s = module.primary_conv, module.cheap_operation, module.short_conv
    x = torch.randn(2, 4, 6, 5, dtype=dtype) if x is None else x
    return [x, p[0].weight, p[1], c[0].weight, c[1], s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5], 6]


def _call(args, backend="eager", **kwargs):
    return ops.ghost_attn(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, error, message", [
    (lambda a: a.__setitem__(0, torch.randn(4, 6, 5)), ValueError, "x must be 4-D"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 4, 6, 5))), TypeError, "x must be float"),
    (lambda a: a.__setitem__(0, torch.randn(2, 5, 6, 5)), ValueError, "primary_weight must have shape"),
    (lambda a: a.__setitem__(0, torch.randn(2, 4, 1, 5)), ValueError, "H >= 2 and W >= 2"),
    (lambda a: a.__setitem__(0, torch.randn(2, 4, 6, 5, dtype=torch.float64)), TypeError,
     "primary_weight must have x's dtype"),
    (lambda a: a.__setitem__(1, a[1][:, :, :, :]), None, None),  # a view is fine
    (lambda a: a.__setitem__(3, torch.randn(3, 1, 4, 4)), ValueError, "cheap_weight must have shape"),
    (lambda a: a.__setitem__(5, torch.randn(6, 4, 1, 1, device="meta")), ValueError, "conv_weight is on meta"),
    (lambda a: a.__setitem__(7, torch.randn(6, 1, 1, 4)), ValueError, "horizontal_weight must have shape"),
    (lambda a: a.__setitem__(9, torch.randn(6, 1, 3, 1)), ValueError, "vertical_weight must have shape"),
    (lambda a: a.__setitem__(2, torch.nn.BatchNorm2d(2)), ValueError, "primary_bn.weight must have shape"),
    (lambda a: a.__setitem__(2, torch.nn.BatchNorm2d(3, affine=False)), ValueError, "primary_bn"),
    (lambda a: a.__setitem__(4, "bn"), TypeError, "cheap_bn must be an nn.BatchNorm2d"),
    (lambda a: a.__setitem__(11, 8), ValueError, "oup must be in"),
    (lambda a: a.__setitem__(11, 6.0), TypeError, "oup must be an int"),
    (lambda a: a.__setitem__(0, torch.randn(1, 4, 3, 2)), ValueError, "more than 1 value per channel"),
])
def test_bad_argument(backend, change, error, message):
    args = _attn_args()
    change(args)
    if error is None:
        assert _call(args, backend, training=True).shape == (2, 6, 6, 5)
        return
    with pytest.raises(error, match=message):
        _call(args, backend, training=True)


def test_bad_flags():
    with pytest.raises(ValueError, match="upsample must be"):
        _call(_attn_args(), upsample="cubic")
    with pytest.raises(ValueError, match="unknown backend"):
        _call(_attn_args(), backend="gpu")


def test_dfc_attention_features_must_match():
    module = ghost_module(4, 6, dtype=torch.float32)
    s = module.short_conv
    x = torch.randn(2, 4, 6, 5)
    for features, error, message in [(torch.randn(2, 5, 6, 5), ValueError, "features must have shape"),
                                     (torch.randn(2, 6, 6, 5).double(), TypeError, "features must have x's dtype"),
                                     (torch.randn(2, 6, 6), ValueError, "features must be 4-D")]:
        with pytest.raises(error, match=message):
            ops.dfc_attention(x, features, s[0].weight, s[1], s[2].weight, s[3], s[4].weight, s[5])


def test_non_contiguous_inputs_are_handled():
    args = _attn_args(torch.randn(2, 4, 12, 5)[:, :, ::2])
    expected = _call([args[0].contiguous()] + args[1:])
    torch.testing.assert_close(_call(args), expected)
