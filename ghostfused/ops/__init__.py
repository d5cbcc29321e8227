"""The fused ops: ``torch.ops.ghostfused.*`` schemas with autograd, and their validating public functions."""

from .batch_norm import BatchNorm, batch_norm_update_stats
from .depthwise_bn import depthwise_bn
from .dfc_attention import dfc_attention
from .ghost_attn import ghost_attn
from .ghost_concat import ghost_concat

__all__ = ["BatchNorm", "batch_norm_update_stats", "depthwise_bn", "dfc_attention", "ghost_attn", "ghost_concat"]
