"""Reference 2-D axial rotary position embedding (RoPE) applied to q and k. The specification.

Layouts: dense q, k (B, H, N, Dh) (SDPA's layout) with pos (B, N, 2) or (N, 2); packed q, k
(T, H, Dh) (flash-attn's varlen layout) with pos (T, 2). pos holds integer (row, column) grid
coordinates per token, so routed or masked tokens carry their own positions (gather pos with the
same index as the tokens). Dh must be even.

Frequencies, as LightningDiT's / DDT's VisionRotaryEmbeddingFast(dim=Dh // 2): the head dim is
P = Dh / 2 interleaved pairs (x[2k], x[2k + 1]); the first Pr = ceil(P / 2) pairs rotate by the
row, the last Pc = floor(P / 2) by the column. Pair j of an axis with Pa pairs turns by
pos * theta ** (-2j / (2 Pa)):

    out[2k]     = x[2k] cos(t_k) - x[2k + 1] sin(t_k)
    out[2k + 1] = x[2k + 1] cos(t_k) + x[2k] sin(t_k),   t_k = pos[axis(k)] * inv_freq[k].

For Dh % 4 == 0 (72, 64, ...) this is exactly LightningDiT's embedding (Pr = Pc = Dh / 4); for
Dh % 4 == 2 the rows get the one extra pair. Angles, cos/sin and the rotation are computed in
float32 (float64 stays float64) and cast back to q's dtype once, at the end. The op is linear in
q and k, so its tangent is itself applied to the tangents, and its backward the inverse rotation.
"""
from __future__ import annotations

import torch

from ._common import _up


def rope2d_pairs(head_dim: int) -> tuple[int, int]:
    """(row pairs Pr, column pairs Pc) of an even head dim: Pr = ceil(Dh / 4), Pc = floor(Dh / 4)."""
    p = head_dim // 2
    return p - p // 2, p // 2


def _axis_inv_freq(pairs: int, theta: float, dtype: torch.dtype, device) -> torch.Tensor:
    # 1 / theta ** (arange(0, 2 Pa, 2) / (2 Pa)), LightningDiT's expression with dim = 2 Pa.
    dim = 2 * pairs
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[:pairs].to(dtype) / dim))


def rope2d_inv_freq(head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
    """(Dh / 2,) inverse frequency of every pair: the row pairs' then the column pairs'."""
    pr, pc = rope2d_pairs(head_dim)
    return torch.cat([_axis_inv_freq(pr, theta, dtype, device), _axis_inv_freq(pc, theta, dtype, device)])


def grid_positions(grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(grid_h * grid_w, 2) int64 (row, column) of a row-major patch grid (DiT's token order)."""
    r = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    c = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.stack([r, c], -1)


def rope2d_angles(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """(..., Dh / 2) angles t_k = pos[..., axis(k)] * inv_freq[k] for pos (..., 2), in dtype."""
    pr, pc = rope2d_pairs(head_dim)
    inv = rope2d_inv_freq(head_dim, theta, dtype, pos.device)
    p = pos.to(dtype)
    per_pair = torch.cat([p[..., :1].expand(*p.shape[:-1], pr), p[..., 1:].expand(*p.shape[:-1], pc)], -1)
    return per_pair * inv


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = _up(x).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2).to(x.dtype)


def _trig(x: torch.Tensor, pos: torch.Tensor, theta: float):
    """cos, sin shaped to broadcast against x's (..., Dh / 2) pairs."""
    ang = rope2d_angles(pos, x.shape[-1], theta, torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.dim() == 4:      # dense (B, H, N, Dh): pos (B, N, 2) -> (B, 1, N, P); (N, 2) broadcasts as is
        ang = ang.unsqueeze(1) if ang.dim() == 3 else ang
    else:                 # packed (T, H, Dh): pos (T, 2) -> (T, 1, P)
        ang = ang.unsqueeze(1)
    return ang.cos(), ang.sin()


def rope2d_one(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """The rotation of one tensor (q or k), dense (B, H, N, Dh) or packed (T, H, Dh)."""
    cos, sin = _trig(x, pos, theta)
    return _rotate(x, cos, sin)


def rope2d(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor,
           theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope(q), rope(k)), both rotated by the same per-token angles."""
    cos, sin = _trig(q, pos, theta)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope2d_jvp(q, k, pos, theta, dq, dk):
    """The tangent of a linear map is the map of the tangents: (rope(dq), rope(dk))."""
    cos, sin = _trig(q, pos, theta)
    return _rotate(dq, cos, sin).to(q.dtype), _rotate(dk, cos, sin).to(k.dtype)
