"""The fused modules' eval-mode path (``ghostfused.ops.define.eval_kernel_output``): an inference call that nothing
observes goes from the module straight to the C++ kernel, which checks its own arguments.

The call must compute what the public op computes (bitwise: the same kernel) and what the reference module computes,
on odd and non-square sizes, N = 0, 1, 3, both layouts; it must not be taken where something observes the call
(autograd, autocast, training mode); and bad inputs must still raise clear errors naming the argument.
"""

import copy

import pytest
import torch
import torch.nn as nn

import ghostfused
from ghostfused import ops, reference
from ghostfused.testing import randomize_batch_norms

from helpers import assert_close, cpu_backends, ghost_module

pytestmark = pytest.mark.skipif("cpu" not in cpu_backends(), reason="the cpu backend is not built")

SHAPES = [(3, 6, 7, 5), (1, 5, 9, 12), (0, 6, 4, 4), (2, 7, 2, 3)]  # (N, Cin, H, W)


def _ops_run(module, x) -> set[str]:
    """The profiler's event names of ``module(x)``."""
    with torch.profiler.profile() as profile:
        module(x)
    return {event.name for event in profile.events()}


def _public_output(module, x) -> torch.Tensor:
    """The public op's output for the fused Ghost module ``module`` (its argument checks, the custom op)."""
    p, c = module.primary_conv, module.cheap_operation
    if module.mode == "original":
        return ops.ghost_concat(x, p[0].weight, p[1], c[0].weight, c[1], module.oup, backend="cpu")
    s = module.short_conv
    return ops.ghost_attn(x, p[0].weight, p[1], c[0].weight, c[1], s[0].weight, s[1], s[2].weight, s[3],
                          s[4].weight, s[5], module.oup, upsample=module.upsample, backend="cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode, upsample", [("original", "nearest"), ("attn", "nearest"), ("attn", "bilinear")])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_ghost_module_runs_the_kernel_directly(shape, mode, upsample, layout, dtype):
    n, cin, h, w = shape
    eager = ghost_module(cin, 10, mode=mode, dtype=dtype, upsample=upsample).eval()
    fused = ghostfused.convert(copy.deepcopy(eager), backend="cpu")
    x = torch.randn(n, cin, h, w, dtype=dtype).contiguous(memory_format=layout)
    op = "ghost_attn" if mode == "attn" else "ghost_concat"
    with torch.no_grad():
        names = _ops_run(fused, x)
        out, public = fused(x), _public_output(fused, x)
        expected = eager(x)
    assert f"ghostfused_C::{op}_forward" in names and f"ghostfused::{op}" not in names
    assert torch.equal(out, public)
    assert out.shape == expected.shape and out.stride() == expected.stride()  # laid out as eager lays it out
    assert_close(out, expected, dtype, f"{mode} {shape}")


@pytest.mark.parametrize("size, kernel", [((17, 19), True), ((14, 13), False)], ids=["9x10-outputs", "7x7-outputs"])
def test_eval_depthwise_pairs(size, kernel):
    """The bottleneck's strided depthwise + BatchNorm and its shortcut's pair, in a converted bottleneck: in eval the
    kernel at once, except for outputs under 64 values per plane (7x7 here), which run the layers; training runs
    the op."""
    eager = randomize_batch_norms(reference.GhostBottleneckV2(6, 12, 8, dw_kernel_size=3, stride=2,
                                                               layer_id=1)).eval()
    fused = ghostfused.convert(copy.deepcopy(eager), backend="cpu")
    x = torch.randn(2, 6, *size)
    with torch.no_grad():
        names = _ops_run(fused, x)
        assert_close(fused(x), eager(x), torch.float32)
        assert ("ghostfused_C::depthwise_bn_forward" in names) == kernel and "ghostfused::depthwise_bn" not in names
        assert "ghostfused_C::depthwise_bn_forward" in _ops_run(fused.train(), x)


def test_calls_that_need_more_than_the_kernel_take_the_public_op():
    """Autograd (the op's autograd node), autocast (the cast) and training mode (statistics, running updates) go
    through the public op and give what eager gives."""
    eager = ghost_module(6, 10, dtype=torch.float32).eval()
    fused = ghostfused.convert(copy.deepcopy(eager), backend="cpu")
    x = torch.randn(2, 6, 8, 6)
    assert type(fused(x).grad_fn).__name__ == "GhostAttnBackward"  # grad mode on, parameters need gradients
    fused(x).sum().backward()
    eager(x).sum().backward()
    assert_close(fused.primary_conv[0].weight.grad, eager.primary_conv[0].weight.grad, torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused(x), eager(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out.float(), expected.float(), torch.bfloat16)
    with torch.no_grad():
        assert_close(fused.train()(x), eager.train()(x), torch.float32)
    assert_close(fused.short_conv[1].running_var, eager.short_conv[1].running_var, torch.float32)
    with torch.inference_mode():
        assert "ghostfused_C::ghost_attn_forward" in _ops_run(fused.eval(), x)


@pytest.mark.parametrize("mode", ["original", "attn"])
def test_eval_module_bad_inputs_raise_clear_errors(mode):
    """The kernel's own checks (TORCH_CHECK) name the argument; no crash."""
    fused = ghostfused.convert(ghost_module(6, 10, mode=mode, dtype=torch.float32).eval(), backend="cpu")
    cases = [(torch.randn(6, 8, 8), "x must be 4-D"),
             (torch.randint(0, 3, (2, 6, 8, 8)), "x must be float16, bfloat16, float32 or float64"),
             (torch.randn(2, 7, 8, 8), "primary_weight must have shape"),
             (torch.randn(2, 6, 8, 8, dtype=torch.float64), "must have x's dtype")]
    if mode == "attn":
        cases.append((torch.randn(2, 6, 1, 8), "H >= 2 and W >= 2"))
    with torch.no_grad():
        for x, message in cases:
            with pytest.raises(RuntimeError, match=message):
                fused(x)
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            fused([[1.0]])


def test_replaced_parameters_are_read_at_each_call():
    """Nothing is cached: a parameter or BatchNorm replaced after conversion is used by the next call."""
    eager = ghost_module(6, 10, dtype=torch.float32).eval()
    fused = ghostfused.convert(copy.deepcopy(eager), backend="cpu")
    x = torch.randn(2, 6, 8, 6)
    with torch.no_grad():
        fused(x)
        weight = torch.ones_like(eager.primary_conv[0].weight)
        horizontal_bn = copy.deepcopy(eager.short_conv[3])
        horizontal_bn.bias.add_(1.0)
        for module in (eager, fused):
            module.primary_conv[0].weight = nn.Parameter(weight.clone())
            module.short_conv[3] = copy.deepcopy(horizontal_bn)
        assert_close(fused(x), eager(x), torch.float32)


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_weights_are_computed_at_each_call():
    """A parametrized layer (torch.nn.utils.parametrize) has no 'weight' parameter: its computed weight is used."""
    eager = ghost_module(6, 10, dtype=torch.float32).eval()
    fused = ghostfused.convert(copy.deepcopy(eager), backend="cpu")
    for module in (eager, fused):
        for conv in (module.primary_conv[0], module.short_conv[2]):
            torch.nn.utils.parametrize.register_parametrization(conv, "weight", _Doubled())
    x = torch.randn(2, 6, 8, 6)
    with torch.no_grad():
        assert "ghostfused_C::ghost_attn_forward" in _ops_run(fused, x)
        assert_close(fused(x), eager(x), torch.float32)


@pytest.mark.parametrize("shape", [(3, 16, 7, 5), (1, 24, 9, 12), (0, 16, 4, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_squeeze_excite_as_linear_layers_matches_the_reference(shape, layout):
    """convert turns our SqueezeExcite into ghostfused.nn.SqueezeExcite: same state dict, output, gradients, layout."""
    n, c, h, w = shape
    eager = reference.SqueezeExcite(c).double()
    fused = ghostfused.convert(nn.Sequential(copy.deepcopy(eager)))[0]
    assert type(fused) is ghostfused.nn.SqueezeExcite
    assert fused.state_dict().keys() == eager.state_dict().keys()
    x = torch.randn(n, c, h, w, dtype=torch.float64).contiguous(memory_format=layout)
    grad = torch.randn(n, c, h, w, dtype=torch.float64)
    outputs = []
    for module in (eager, fused):
        x_leaf = x.clone().requires_grad_()
        out = module(x_leaf)
        out.backward(grad)
        outputs.append((out, x_leaf.grad, *(p.grad for p in module.parameters())))
    for actual, expected in zip(outputs[1], outputs[0]):
        assert_close(actual, expected, torch.float64)
    assert outputs[1][0].stride() == outputs[0][0].stride()


def test_converted_bottleneck_gets_the_linear_squeeze_excite():
    model = ghostfused.convert(nn.Sequential(reference.GhostBottleneckV2(8, 24, 16, se_ratio=0.25, layer_id=2)))
    assert type(model[0]) is ghostfused.nn.GhostBottleneckV2 and type(model[0].se) is ghostfused.nn.SqueezeExcite
