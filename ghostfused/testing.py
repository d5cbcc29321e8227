"""Helpers shared by the tests and the benchmarks."""

import torch
from torch import nn


def randomize_batch_norms(module: nn.Module) -> nn.Module:
    """Give every BatchNorm2d of ``module`` non-trivial state, in place, and return ``module``.

    A fresh BatchNorm (weight 1, bias 0, mean 0, var 1) is nearly the identity in eval mode, which would hide a kernel
    that swaps or drops a BatchNorm term. Draws from torch's global generator: weight and running_var uniform in
    [0.5, 1.5], bias and running_mean normal(0, 0.2).
    """
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.2)
                bn.running_mean.normal_(0, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
    return module
