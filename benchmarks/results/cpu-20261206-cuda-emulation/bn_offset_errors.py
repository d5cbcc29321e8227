"""BatchNorm input gradients with a large common input offset: the cpu backend and eager float32 against a float64 truth
(max abs error over max abs truth). Run from the repository root: .venv/bin/python <this file>."""
import sys, copy, torch
sys.path.insert(0, "tests")
import test_numerics as T
from helpers import fused_copy
for off in (1e3, 1e4, 1e5):
  for backend in ("cpu",):
    for mode in ("original", "attn"):
        torch.manual_seed(0)
        module = T._module(mode, torch.float32, True, "cpu")
        fused = fused_copy(module, backend)
        x = off + torch.randn(T.N, T.CIN, T.H, T.W)
        grad = torch.randn(T.N, T.OUP, T.H, T.W)
        t_out, t_dx, _ = T._forward_backward(copy.deepcopy(module).double(), x.double(), grad.double())
        e_out, e_dx, _ = T._forward_backward(module, x, grad)
        a_out, a_dx, _ = T._forward_backward(fused, x, grad)
        err = lambda a, t: ((a.double()-t).abs().max()/t.abs().max()).item()
        print(f"offset {off:g} {mode:8s} out: eager {err(e_out,t_out):.2e} {backend} {err(a_out,t_out):.2e} | dx: eager {err(e_dx,t_dx):.2e} {backend} {err(a_dx,t_dx):.2e}")
