"""Reference attention over visible tokens. The specification.

Dense form: q, k, v (B, H, K, Dh), the K visible tokens of every sample already gathered.
Packed form: q, k, v (T, H, Dh), the visible tokens of all samples concatenated without padding;
sample i owns rows cu_seqlens[i]:cu_seqlens[i+1] (flash-attn's varlen convention). Attention never
crosses samples. Softmax in float32; scale defaults to Dh ** -0.5.
"""
from __future__ import annotations


import torch

from ._common import _up


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per (sample, head): (B, H, K, Dh) -> (B, H, K, Dh)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", _up(q), _up(k)) * scale
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), _up(v)).to(q.dtype)


def dense_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of dense_attention written out (softmax backward), for ops that cannot rely on
    autograd inside their implementation: (dq, dk, dv), each (B, H, K, Dh) in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf, df = _up(q), _up(k), _up(v), _up(dout)
    p = (torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale).softmax(-1)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, df)
    dp = torch.einsum("bhqd,bhkd->bhqk", df, vf)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kf)
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _segments(cu_seqlens: torch.Tensor, *tensors: torch.Tensor):
    """Per segment of the packed form, each tensor's rows as (1, H, L, Dh)."""
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield a, b, [t[a:b].transpose(0, 1).unsqueeze(0) for t in tensors]


def varlen_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens: torch.Tensor, scale: float | None = None):
    """Gradients of varlen_attention, one segment at a time: (dq, dk, dv), each (T, H, Dh)."""
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for a, b, seg in _segments(cu_seqlens, dout, q, k, v):
        for g, d in zip(grads, dense_attention_backward(*seg, scale=scale)):
            g[a:b] = d[0].transpose(0, 1)
    return tuple(grads)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Packed attention, one segment at a time: (T, H, Dh) -> (T, H, Dh). max_seqlen is unused here."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for a, b, seg in _segments(cu_seqlens, q, k, v):
        out[a:b] = dense_attention(*seg, scale=scale)[0].transpose(0, 1)
    return out


def lengths_to_cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """Per-sample token counts (S,) -> int32 offsets (S + 1,) starting at 0."""
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


