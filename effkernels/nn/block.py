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
from .modulation import GatedResidual, GatedResidualModulatedLayerNorm, ModulatedLayerNorm


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2, timm's Mlp as DiT uses it: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def adaln_zero(x: torch.Tensor, c: torch.Tensor, modulation, attn, mlp, norm1, norm2, residual) -> torch.Tensor:
    """The adaLN-Zero block's arithmetic, written once: DiTBlock and the official blocks that
    effkernels.models.interop.patch.apply_effkernels patches both run it with their own parts.

    modulation(c) -> (B, 6D) (or per token); attn(h), mlp(h) -> like h; norm1(x, shift, scale) -> h;
    norm2(x, y, gate, shift, scale) -> (x + gate * y, LN(.) * (1 + scale) + shift);
    residual(x, y, gate) -> x + gate * y.
    """
    mod = modulation(c)
    if mod.dtype != x.dtype:
        mod = mod.to(x.dtype)
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # strided views, never copied
    h = norm1(x, shift1, scale1)
    x, h = norm2(x, attn(h).to(x.dtype), gate1, shift2, scale2)
    return residual(x, mlp(h).to(x.dtype), gate2)


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated LN -> attention -> gated residual -> modulated LN -> MLP -> gated residual.

    Args:
        dim: width D; num_heads: attention heads (divides D); mlp_ratio: MLP hidden = int(D * mlp_ratio);
        eps: LayerNorm epsilon (1e-6 as in DiT); cond_dim: width of c when it differs from D (MaskDiT's
            512-wide decoder blocks are conditioned on the backbone's c); qk_norm: per-head LayerNorm
            of q and k (REPA's --qk-norm, see VisibleAttention); backend: passed to every op.
    forward(x (B, N, D), c (B, C) per sample or (B, N, C) per token, C = cond_dim or D) -> (B, N, D).
        With cu_seqlens/max_seqlen, x is packed (T, D) and attention runs within each segment only;
        c is then per sample (S, C) with segment_ids (T,) naming each row's sample (the modulation
        is computed per sample and broadcast to its rows), or per token (T, C) without segment_ids.

    Equal to the official block  x = x + g1 * attn(modulate(norm1(x), s1, sc1));
    x = x + g2 * mlp(modulate(norm2(x), s2, sc2))  with the residual add of the first half fused into
    the second LayerNorm (one pass over x and the attention output). adaLN's six chunks are strided
    views of one (B, 6D) tensor, never copied. Under autocast the chunks and the branch outputs come
    back in the autocast dtype; they are cast to x's dtype so the residual stream keeps its own.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *, eps: float = 1e-6,
                 qkv_bias: bool = True, qk_norm: bool = False, cond_dim: int | None = None,
                 backend: str | None = None):
        super().__init__()
        check_positive_int("dim", dim)
        if cond_dim is not None:
            check_positive_int("cond_dim", cond_dim)
        check_positive_float("mlp_ratio", mlp_ratio)
        self.backend = check_backend(backend)
        self.norm1 = ModulatedLayerNorm(dim, eps, backend=backend)
        self.attn = VisibleAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, backend=backend)
        self.norm2 = GatedResidualModulatedLayerNorm(dim, eps, backend=backend)
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an empty MLP for dim={dim}")
        self.mlp = Mlp(dim, hidden)
        self.residual = GatedResidual(backend=backend)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        packed = cu_seqlens is not None
        if packed:
            if segment_ids is not None:
                if x.dim() != 2 or c.dim() != 2 or segment_ids.shape != (x.shape[0],):
                    raise ValueError(f"packed x, c and segment_ids must be (T, D), (S, C) and (T,), got "
                                     f"{tuple(x.shape)}, {tuple(c.shape)} and {tuple(segment_ids.shape)}")
            elif x.dim() != 2 or c.dim() != 2 or c.shape[0] != x.shape[0]:
                raise ValueError(f"packed x and c must be (T, D) and (T, C), got {tuple(x.shape)} and {tuple(c.shape)}")

            def modulation(c):
                mod = self.adaLN_modulation(c)
                if segment_ids is not None:
                    # Conditioning per sample: the modulation is computed once per sample (S, 6D)
                    # and each packed row takes its sample's row, not a (T x C) linear per token;
                    # its gradient sums each segment's rows in a fixed order (deterministic).
                    mod = ops.segment_expand(mod, segment_ids, cu_seqlens, max_seqlen)
                # The adaLN ops are written for (B, N, D): a packed sequence is one sample of T tokens.
                return mod.unsqueeze(0)

            def attn(h):
                return self.attn(h[0], cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).unsqueeze(0)
            x = x.unsqueeze(0)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids needs packed input (cu_seqlens and max_seqlen)")
            modulation, attn = self.adaLN_modulation, self.attn
        x = adaln_zero(x, c, modulation, attn, self.mlp, self.norm1, self.norm2, self.residual)
        return x[0] if packed else x
