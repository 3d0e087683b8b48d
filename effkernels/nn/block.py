"""DiT's adaLN-Zero transformer block, built from the fused effkernels.nn modules.

Parameter names match the official DiT/SiT/REPA blocks (norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2, adaLN_modulation.1), so their state dicts load into it unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._common import check_backend, check_positive_float, check_positive_int
from .attention import VisibleAttention
from .modulation import (
    GatedResidual,
    GatedResidualModulatedLayerNorm,
    GatedResidualModulatedRMSNorm,
    ModulatedLayerNorm,
    ModulatedRMSNorm,
)
from .routing import TokenPack


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2, timm's Mlp as DiT uses it: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def adaln_zero(x: torch.Tensor, mod: torch.Tensor, parts, **attn_kw) -> torch.Tensor:
    """The adaLN-Zero block's arithmetic, written once: DiTBlock runs it with itself as `parts`, and
    effkernels.models.interop.patch.apply_effkernels with an official block's own attn and mlp.

    x (B, N, D); mod = adaLN_modulation(c): (B, 6D) per sample or (B, N, 6D) per token.
    parts: an object with norm1 (ModulatedLayerNorm), norm2 (GatedResidualModulatedLayerNorm),
    residual (GatedResidual), attn and mlp (modules (B, N, D) -> (B, N, D); attn gets attn_kw).
    Returns x + g1 * attn(...) + g2 * mlp(...) as the block computes it, (B, N, D) in x's dtype.
    """
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.to(x.dtype).chunk(6, dim=-1)  # strided views
    h = parts.norm1(x, shift1, scale1)
    x, h = parts.norm2(x, parts.attn(h, **attn_kw).to(x.dtype), gate1, shift2, scale2)
    return parts.residual(x, parts.mlp(h).to(x.dtype), gate2)


class SwiGLUMlp(nn.Module):
    """w3(silu(a) * b) with (a, b) = w12(x).chunk(2): the SwiGLU MLP of LightningDiT (DINOv2's
    SwiGLUFFN layout, parameters w12, w3), its elementwise half fused (effkernels.ops.swiglu on the
    two strided halves of one projection, never copied). (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int, *, backend: str | None = None):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(ops.swiglu(a, b, backend=self.backend))


NORMS = {"layernorm": (ModulatedLayerNorm, GatedResidualModulatedLayerNorm),
         "rmsnorm": (ModulatedRMSNorm, GatedResidualModulatedRMSNorm)}
MLPS = ("gelu", "swiglu")


def mlp_hidden(dim: int, mlp_ratio: float, mlp: str) -> int:
    """The MLP's hidden width: int(dim * mlp_ratio) for GELU; two thirds of it for SwiGLU, as
    LightningDiT (int(2 / 3 * int(dim * mlp_ratio))), so both hold about the same parameters."""
    hidden = int(dim * mlp_ratio)
    return int(2 / 3 * hidden) if mlp == "swiglu" else hidden


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated LN -> attention -> gated residual -> modulated LN -> MLP -> gated residual.

    Args:
        dim: width D; num_heads: attention heads (divides D); mlp_ratio: MLP hidden = int(D * mlp_ratio);
        eps: the norms' epsilon (1e-6 as in DiT); norm: "layernorm" (DiT's, no affine) or "rmsnorm"
            (LightningDiT's, a learned weight); mlp: "gelu" (DiT's Mlp) or "swiglu" (SwiGLUMlp, hidden
            mlp_hidden(dim, mlp_ratio, "swiglu")); rope: 2-D rotary q/k (forward then takes pos);
            cond_dim: width of c when it differs from D (MaskDiT's
            512-wide decoder blocks are conditioned on the backbone's c); qk_norm: per-head LayerNorm
            of q and k: False, True/"layernorm" (REPA's --qk-norm) or "rmsnorm" (see VisibleAttention);
            backend: passed to every op.
    forward(x (B, N, D), c (B, C) per sample or (B, N, C) per token, C = cond_dim or D) -> (B, N, D).
        With pack (an effkernels.nn.routing.TokenPack), x holds the pack's rows (T, D), attention
        runs within each sample only, and c is per sample (B, C): each sample's modulation is
        computed once and broadcast to its rows. -> (T, D).
        With rope, pos: the tokens' (row, column) positions, (N, 2) or (B, N, 2) int, (T, 2) packed.

    Equal to the official block  x = x + g1 * attn(modulate(norm1(x), s1, sc1));
    x = x + g2 * mlp(modulate(norm2(x), s2, sc2))  with the residual add of the first half fused into
    the second LayerNorm (one pass over x and the attention output). adaLN's six chunks are strided
    views of one (B, 6D) tensor, never copied. Under autocast the chunks and the branch outputs come
    back in the autocast dtype; they are cast to x's dtype so the residual stream keeps its own.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, eps: float = 1e-6,
                 qkv_bias: bool = True, qk_norm: bool | str = False, cond_dim: int | None = None,
                 norm: str = "layernorm", mlp: str = "gelu", rope: bool = False, backend: str | None = None):
        super().__init__()
        check_positive_int("dim", dim)
        if cond_dim is not None:
            check_positive_int("cond_dim", cond_dim)
        check_positive_float("mlp_ratio", mlp_ratio)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {mlp!r}")
        self.backend = check_backend(backend)
        first, fused = NORMS[norm]
        affine = norm == "rmsnorm"  # LightningDiT's RMSNorm learns a weight; DiT's LayerNorms learn nothing
        self.norm1 = first(dim, eps, affine, backend=backend)
        self.attn = VisibleAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, rope=rope, backend=backend)
        self.norm2 = fused(dim, eps, affine, backend=backend)
        hidden = mlp_hidden(dim, mlp_ratio, mlp)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an empty MLP for dim={dim}")
        self.mlp = Mlp(dim, hidden) if mlp == "gelu" else SwiGLUMlp(dim, hidden, backend=backend)
        self.residual = GatedResidual(backend=backend)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, pack: TokenPack | None = None,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        kw = {} if pos is None else {"pos": pos}
        if pack is None:
            return adaln_zero(x, self.adaLN_modulation(c), self, **kw)  # (B, N, D)
        if not isinstance(pack, TokenPack):
            raise TypeError(f"pack must be a TokenPack or None, got {type(pack).__name__}")
        if x.dim() != 2 or x.shape[0] != pack.total or c.dim() != 2 or c.shape[0] != pack.batch:
            raise ValueError(f"with pack ({pack.batch} samples, {pack.total} rows) x and c must be "
                             f"({pack.total}, D) and ({pack.batch}, C), got {tuple(x.shape)} and {tuple(c.shape)}")
        mod = pack.expand(self.adaLN_modulation(c))  # (T, 6D): each row its sample's modulation
        # The adaLN ops are written for (B, N, D): the packed rows are one sequence of T tokens.
        out = adaln_zero(x[None], mod[None], self, cu_seqlens=pack.cu_seqlens, max_seqlen=pack.max_seqlen, **kw)
        return out[0]  # (T, D)
