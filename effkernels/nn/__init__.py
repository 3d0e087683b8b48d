"""Drop-in nn.Modules built on effkernels.ops, each taking an optional backend= passed to the ops.

  ModulatedLayerNorm(dim, eps, elementwise_affine)      LN(x) * (1 + scale) + shift
  GatedResidual()                                       x + gate * y
  GatedResidualModulatedLayerNorm(dim, eps, ...)        (h = x + gate * y, LN(h) * (1 + scale) + shift)
  TokenRouter(ratio, generator)                         draw / gather / scatter back routed tokens
  VisibleAttention(dim, num_heads, qkv_bias)            self-attention, dense or packed varlen
  AlignmentHead(dim, z_dim, hidden, loss)               REPA projector + alignment loss
  DiTBlock(dim, num_heads, mlp_ratio)                   adaLN-Zero transformer block
"""
from .align import AlignmentHead
from .attention import VisibleAttention
from .block import DiTBlock, Mlp
from .modulation import GatedResidual, GatedResidualModulatedLayerNorm, ModulatedLayerNorm
from .routing import TokenRouter

__all__ = [
    "AlignmentHead", "DiTBlock", "GatedResidual", "GatedResidualModulatedLayerNorm", "Mlp",
    "ModulatedLayerNorm", "TokenRouter", "VisibleAttention",
]
