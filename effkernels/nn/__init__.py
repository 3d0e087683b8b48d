"""Drop-in nn.Modules built on effkernels.ops, each taking an optional backend= passed to the ops.

  ModulatedLayerNorm(dim, eps, elementwise_affine)      LN(x) * (1 + scale) + shift
  GatedResidual()                                       x + gate * y
  GatedResidualModulatedLayerNorm(dim, eps, ...)        (h = x + gate * y, LN(h) * (1 + scale) + shift)
  ModulatedRMSNorm, GatedResidualModulatedRMSNorm       the same with RMSNorm (LightningDiT's norms)
  SwiGLUMlp(dim, hidden)                                w3(silu(a) * b), (a, b) = w12(x).chunk(2)
  TokenRouter(ratio, generator)                         draw / gather / scatter back routed tokens
  VisibleAttention(dim, num_heads, qkv_bias)            self-attention, dense or packed varlen
  AlignmentHead(dim, z_dim, hidden, loss)               REPA projector + alignment loss
  DiTBlock(dim, num_heads, mlp_ratio, norm, mlp, rope)  adaLN-Zero transformer block (DiT's or LightningDiT's)
"""
from .align import AlignmentHead
from .attention import VisibleAttention
from .block import DiTBlock, Mlp, SwiGLUMlp
from .modulation import (
                         GatedResidual,
                         GatedResidualModulatedLayerNorm,
                         GatedResidualModulatedRMSNorm,
                         ModulatedLayerNorm,
                         ModulatedRMSNorm,
)
from .routing import TokenRouter

__all__ = [
    "AlignmentHead", "DiTBlock", "GatedResidual", "GatedResidualModulatedLayerNorm", "GatedResidualModulatedRMSNorm",
    "Mlp", "ModulatedLayerNorm", "ModulatedRMSNorm", "SwiGLUMlp", "TokenRouter", "VisibleAttention",
]
