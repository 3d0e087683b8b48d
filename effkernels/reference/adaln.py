"""Reference adaLN ops: LayerNorm + modulation, gated residual, and the fused pair. The specification.

x, y: (B, N, D). shift, scale, gate: per sample (B, D) or per token (B, N, D); per-sample ones
broadcast over N. weight, bias: (D,) or None (DiT's LayerNorm has no affine). Statistics are
computed in float32 and the result is cast back to x's dtype.
"""
from __future__ import annotations

import torch

from ._common import _up


def _per_token(m: torch.Tensor) -> torch.Tensor:
    return m.unsqueeze(1) if m.dim() == 2 else m


def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift, LN over the last dim with optional affine (weight, bias)."""
    xf = _up(x)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    h = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        h = h * _up(weight)
    if bias is not None:
        h = h + _up(bias)
    out = h * (1 + _up(_per_token(scale))) + _up(_per_token(shift))
    return out.to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, computed in float32."""
    return (_up(x) + _up(_per_token(gate)) * _up(y)).to(x.dtype)


def gated_residual_modulate_layernorm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                      shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                                      weight: torch.Tensor | None = None,
                                      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + gate * y (the block's residual add), then (h, LN(h) * (1 + scale) + shift).

    The LayerNorm reads h as stored in x's dtype, exactly as the unfused pair would.
    """
    h = gated_residual(x, y, gate)
    return h, modulate_layernorm(h, shift, scale, eps, weight, bias)
