"""Reference RMSNorm ops: RMSNorm + modulation and the fused gated residual + RMSNorm + modulation.
The specification, and their analytic tangents (JVPs).

x, y: (B, N, D). shift, scale, gate: per sample (B, D) or per token (B, N, D); per-sample ones
broadcast over N. weight: (D,) or None (RMSNorm without affine). RMSNorm has no bias and no mean:
rms(x) = sqrt(mean(x^2) + eps) over the last dim. The statistic and every product are computed in
float32 (float64 stays float64) and the result is cast back to x's dtype once, at the end.
"""
from __future__ import annotations

import torch

from ._common import _up
from .adaln import _per_token, gated_residual


def rms_rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, keepdim, in xf's dtype (float32 or float64)."""
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rmsnorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x) * (1 + scale) + shift with RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight."""
    xf = _up(x)
    h = xf * rms_rstd(xf, eps)
    if weight is not None:
        h = h * _up(weight)
    out = h * (1 + _up(_per_token(scale))) + _up(_per_token(shift))
    return out.to(x.dtype)


def gated_residual_rmsnorm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                    scale: torch.Tensor, eps: float = 1e-6,
                                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + gate * y (the block's residual add), then (h, RMSNorm(h) * (1 + scale) + shift).

    The RMSNorm reads h as stored in x's dtype, exactly as the unfused pair would.
    """
    h = gated_residual(x, y, gate)
    return h, rmsnorm_modulate(h, shift, scale, eps, weight)


# ---------------------------------------------------------------------------------------------
# Tangents (forward mode): what the ops' JVP rules compute, out of place (vmap-able)
# ---------------------------------------------------------------------------------------------

def rmsnorm_modulate_jvp(x, shift, scale, eps, weight, dx, dshift, dscale, dweight=None):
    """d[RMSNorm(x) * (1 + scale) + shift]: with r = rsqrt(mean(x^2) + eps) and xhat = x r,
    d xhat = r (dx - xhat mean(xhat dx)) (mean over D), h = xhat w, dh = d xhat w + xhat dw,
    d out = dh (1 + scale) + h dscale + dshift; float32 (float64 kept), in x's dtype."""
    xf, dxf = _up(x), _up(dx)
    r = rms_rstd(xf, eps)
    xhat = xf * r
    dxhat = r * (dxf - xhat * (xhat * dxf).mean(-1, keepdim=True))
    h, dh = xhat, dxhat
    if weight is not None:
        h, dh = xhat * _up(weight), dxhat * _up(weight) + xhat * _up(dweight)
    dout = dh * (1 + _up(_per_token(scale))) + h * _up(_per_token(dscale)) + _up(_per_token(dshift))
    return dout.to(x.dtype)


def gated_residual_rmsnorm_modulate_jvp(x, y, gate, shift, scale, eps, weight, dx, dy, dgate, dshift, dscale,
                                        dweight=None, h=None):
    """(dh, d out) of the fused pair; h (x + gate * y as stored in x's dtype) is recomputed unless
    given. dh = dx + dgate y + gate dy is rounded to x's dtype before the RMSNorm's tangent reads it."""
    h = gated_residual(x, y, gate) if h is None else h
    g, dg = _up(_per_token(gate)), _up(_per_token(dgate))
    dh = (_up(dx) + dg * _up(y) + g * _up(dy)).to(x.dtype)
    return dh, rmsnorm_modulate_jvp(h, shift, scale, eps, weight, dh, dshift, dscale, dweight)
