"""Analytic tangents (JVPs) of the ops, in plain PyTorch: what the ops' forward-mode rules compute.

Each `<op>_jvp(primals..., tangents...)` returns d(op) for the given input tangents (every tangent a
tensor shaped like its primal; zeros for an input that has none). The math follows the reference
of the op step by step: float32 for 16/32-bit inputs, float64 kept, statistics recomputed from the
primal, result in the output's dtype, so it equals torch's own forward AD through the reference up
to rounding. Only out-of-place ops, so it runs under vmap (jacfwd) with batched tangents.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _up
from .adaln import _per_token, gated_residual
from .align import norm_clamp
from .attention import dense_attention


# ---------------------------------------------------------------------------------------------
# adaLN
# ---------------------------------------------------------------------------------------------

def modulate_layernorm_jvp(x, shift, scale, eps, weight, bias, dx, dshift, dscale, dweight=None, dbias=None):
    """d[LN(x) * (1 + scale) + shift]: with xhat = (x - mean) * rstd,
    d xhat = rstd * (dx - mean(dx) - xhat * mean(xhat * dx)) (means over D), h = xhat * w + b,
    dh = d xhat * w + xhat * dw + db, d out = dh * (1 + scale) + h * dscale + dshift."""
    xf, dxf = _up(x), _up(dx)
    xc = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    dxhat = rstd * (dxf - dxf.mean(-1, keepdim=True) - xhat * (xhat * dxf).mean(-1, keepdim=True))
    h, dh = xhat, dxhat
    if weight is not None:
        h, dh = xhat * _up(weight), dxhat * _up(weight) + xhat * _up(dweight)
    if bias is not None:
        h, dh = h + _up(bias), dh + _up(dbias)
    dout = dh * (1 + _up(_per_token(scale))) + h * _up(_per_token(dscale)) + _up(_per_token(dshift))
    return dout.to(x.dtype)


def gated_residual_jvp(x, y, gate, dx, dy, dgate):
    """d[x + gate * y] = dx + dgate * y + gate * dy, in float32, in x's dtype."""
    g, dg = _up(_per_token(gate)), _up(_per_token(dgate))
    return (_up(dx) + dg * _up(y) + g * _up(dy)).to(x.dtype)


def gated_residual_modulate_layernorm_jvp(x, y, gate, shift, scale, eps, weight, bias,
                                          dx, dy, dgate, dshift, dscale, dweight=None, dbias=None, h=None):
    """(dh, d out) of the fused pair; h (x + gate * y as stored in x's dtype) is recomputed unless
    given. dh is rounded to x's dtype before the LayerNorm's tangent reads it, as h is."""
    h = gated_residual(x, y, gate) if h is None else h
    dh = gated_residual_jvp(x, y, gate, dx, dy, dgate)
    return dh, modulate_layernorm_jvp(h, shift, scale, eps, weight, bias, dh, dshift, dscale, dweight, dbias)


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------

def _cosine_jvp(y, dy, z, e):
    """d cos(y, z) for a target z without tangent, norms floored at e (F.normalize's clamp):
    a = max(|y|, e), cos = <y, z^> / a with z^ = z / max(|z|, e),
    d cos = <dy, z^> / a - [|y| >= e] cos <y, dy> / a^2   (float32 or float64)."""
    zt = F.normalize(z, dim=-1, eps=e)
    ny = y.norm(dim=-1)
    a = ny.clamp_min(e)
    cos = (y * zt).sum(-1) / a
    g = (ny >= e).to(y.dtype)
    return (dy * zt).sum(-1) / a - g * cos * (y * dy).sum(-1) / (a * a)


def per_token_cosine_jvp(z_hat, z, eps, dz_hat):
    """d per_token_cosine(z_hat, z) (z never differentiated): (B, N), float32 (float64 kept)."""
    return _cosine_jvp(_up(z_hat), _up(dz_hat), _up(z.detach()), norm_clamp(eps, z_hat.dtype))


def projected_cosine_jvp(h, weight, bias, z, eps, dh, dweight, dbias, chunk: int | None = None):
    """d projected_cosine: y = h W^T + b, dy = dh W^T + h dW^T + db, then _cosine_jvp; computed
    `chunk` tokens at a time (all at once for None), so y and dy never exist whole."""
    B, N, K = h.shape
    e = norm_clamp(eps, h.dtype)
    hf, dhf = _up(h).reshape(B * N, K), _up(dh).reshape(B * N, K)
    zf = _up(z.detach()).reshape(B * N, -1)
    w, dw = _up(weight), _up(dweight)
    b, db = (None, None) if bias is None else (_up(bias), _up(dbias))
    step = B * N if not chunk else chunk
    parts = []
    for s in range(0, B * N, max(step, 1)):
        hs, dhs = hf[s:s + step], dhf[s:s + step]
        y = F.linear(hs, w, b)
        dy = F.linear(dhs, w, db) + F.linear(hs, dw)
        parts.append(_cosine_jvp(y, dy, zf[s:s + step], e))
    return (torch.cat(parts) if parts else hf.new_zeros(B * N)).reshape(B, N)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def dense_attention_jvp(q, k, v, dq, dk, dv, scale=None):
    """d softmax(q k^T s) v per (sample, head), (..., L, Dh): with P the softmax, O = P v and
    dS = s (dq k^T + q dk^T):  dO = (P * dS) v - rowsum(P * dS) O + P dv. In q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = _up(q), _up(k), _up(v)
    p = (qf @ kf.transpose(-1, -2) * scale).softmax(-1)
    ds = (_up(dq) @ kf.transpose(-1, -2) + qf @ _up(dk).transpose(-1, -2)) * scale
    pds = p * ds
    do = pds @ vf - pds.sum(-1, keepdim=True) * (p @ vf) + p @ _up(dv)
    return do.to(q.dtype)


def _segment_bounds(cu_seqlens):
    b = cu_seqlens.tolist()
    return list(zip(b[:-1], b[1:]))


def varlen_attention_jvp(q, k, v, cu_seqlens, dq, dk, dv, scale=None):
    """d varlen_attention, one segment at a time: (T, H, Dh), in q's dtype."""
    parts = []
    for a, b in _segment_bounds(cu_seqlens):
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v, dq, dk, dv)]  # (H, L, Dh)
        parts.append(dense_attention_jvp(*seg, scale=scale).transpose(0, 1))
    return torch.cat(parts) if parts else torch.zeros_like(dq)


def varlen_attention(q, k, v, cu_seqlens, scale=None):
    """reference.attention.varlen_attention written without in-place writes (segments concatenated),
    so that torch.func can differentiate and vmap it: (T, H, Dh)."""
    parts = []
    for a, b in _segment_bounds(cu_seqlens):
        seg = [t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        parts.append(dense_attention(*seg, scale=scale)[0].transpose(0, 1))
    return torch.cat(parts, 0) if parts else torch.zeros_like(q)
