// The extension's entry point: the schemas of the backend kernels (namespace ghostfused_C) and the Python module.
//
// Each fused op <op> of ghostfused/ops/<op>.py has a <op>_forward and a <op>_backward kernel here with the same
// arguments as the Python op, without `backend`. The CPU kernels register under the CPU dispatch key
// (csrc/cpu/<op>.cpp), the CUDA ones under CUDA (csrc/cuda/<op>_glue.cpp); the `cpu` and `cuda` backends call
// torch.ops.ghostfused_C.<op>_forward / _backward and the dispatcher picks by device.
#include <torch/extension.h>

#include "ghostfused/schemas.h"

TORCH_LIBRARY(ghostfused_C, m) {
  m.def("ghost_concat_forward(" GHOSTFUSED_GHOST_CONCAT_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("ghost_concat_backward(Tensor grad_out, " GHOSTFUSED_GHOST_CONCAT_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("dfc_attention_forward(" GHOSTFUSED_DFC_ATTENTION_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("dfc_attention_backward(Tensor grad_out, " GHOSTFUSED_DFC_ATTENTION_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ghost_attn_forward(" GHOSTFUSED_GHOST_ATTN_ARGS ") -> (Tensor, Tensor, Tensor)");
  m.def("ghost_attn_backward(Tensor grad_out, " GHOSTFUSED_GHOST_ATTN_ARGS
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_with_cuda", [] { return GHOSTFUSED_WITH_CUDA != 0; },
        "Whether the extension was compiled with its CUDA kernels.");
}
