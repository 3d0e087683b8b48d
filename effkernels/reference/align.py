"""Reference alignment losses (REPA / ERW / SRA). The specification.

z_hat: the projection of a hidden state (B, N, D); z: the target (B, N, D), never differentiated.
Every loss is a float32 scalar: the mean over batch and tokens of a per-token distance, or with
token_weight (B, N) the weighted sum of the per-token distances instead (per-sample token budgets:
packed rows weighted 1 / (B * their sample's count)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _up


def norm_clamp(eps: float, dtype: torch.dtype) -> float:
    """The floor of both norms: eps, raised to the smallest normal number of z_hat's dtype.

    |d cos / d z_hat| <= 1 / floor (the bound is reached on a row whose norm is below the floor,
    where the gradient is z / (floor |z|)). With eps = 1e-8 that is 1e8, past float16's max (65504),
    so a zero fp16 row got an infinite gradient from a finite loss. 1 / tiny is a quarter of the max
    in every IEEE format, so with this floor the gradient of a mean loss stays finite in any dtype;
    for float32, bfloat16 and float64 (tiny <= 1.2e-38) the floor is eps itself, F.normalize's rule.
    Raising the floor (not clamping the gradient) keeps the gradient the exact derivative of the
    forward and proportional to the upstream gradient, so a loss scaler still sees true overflows.
    """
    return max(float(eps), torch.finfo(dtype).tiny)


def per_token_cosine(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(z_hat[b,n], z[b,n]) over D: (B, N, D) x2 -> (B, N), both L2-normalised in float32.

    Norms are clamped below at norm_clamp(eps, z_hat.dtype) (F.normalize's rule; eps itself except
    for float16 projections) so a zero row gives cos 0, not NaN, and a finite gradient.
    """
    e = norm_clamp(eps, z_hat.dtype)
    zh = F.normalize(_up(z_hat), dim=-1, eps=e)
    zt = F.normalize(_up(z.detach()), dim=-1, eps=e)
    return (zh * zt).sum(-1)


def reduce_tokens(per_token: torch.Tensor, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) float32 -> the mean, or sum(token_weight * per_token) with token_weight (B, N)."""
    return per_token.mean() if token_weight is None else (per_token * token_weight.float()).sum()


def cosine_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8,
                          token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """-mean over batch and tokens of per_token_cosine (REPA's loss); weighted: reduce_tokens."""
    return -reduce_tokens(per_token_cosine(z_hat, z, eps), token_weight)


def smooth_l1_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, beta: float = 0.05,
                             token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth-L1 (Huber, transition at beta): the mean over ALL elements (batch, tokens and D), as
    F.smooth_l1_loss(z_hat, z, beta=beta) (reduction "mean", SRA's original loss); weighted:
    reduce_tokens of the per-token mean over D."""
    d = F.smooth_l1_loss(_up(z_hat), _up(z.detach()), beta=beta, reduction="none")
    return reduce_tokens(d.mean(-1), token_weight)


def mse_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor,
                       token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error: the mean over ALL elements (batch, tokens and D), as F.mse_loss(z_hat, z);
    weighted: reduce_tokens of the per-token mean over D."""
    return reduce_tokens((_up(z_hat) - _up(z.detach())).pow(2).mean(-1), token_weight)


# ---------------------------------------------------------------------------------------------
# The projector's last Linear fused into the cosine loss (REPA's head): the spec of ops.projected_cosine
# ---------------------------------------------------------------------------------------------

def projected_cosine(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor,
                     eps: float = 1e-8) -> torch.Tensor:
    """cos(h[b,n] W^T + bias, z[b,n]): h (B, N, K), weight (Z, K), bias (Z,) or None, z (B, N, Z) -> (B, N).

    The projection y = h W^T + bias is computed in float32 (never rounded to h's dtype) and then
    treated as per_token_cosine treats z_hat, with the norm floor of h's dtype (norm_clamp): the
    projection's gradient reaches h through W in h's dtype, so h's dtype bounds it.
    """
    y = F.linear(_up(h), _up(weight), None if bias is None else _up(bias))
    e = norm_clamp(eps, h.dtype)
    return (F.normalize(y, dim=-1, eps=e) * F.normalize(_up(z.detach()), dim=-1, eps=e)).sum(-1)


def projected_cosine_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor,
                          eps: float = 1e-8) -> torch.Tensor:
    """-mean over batch and tokens of projected_cosine: REPA's loss with its last Linear inside.

    Every sample has N tokens, so the mean over (B, N) counts every sample 1/B.
    """
    return -projected_cosine(h, weight, bias, z, eps).mean()


def projected_cosine_backward(dcos: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None, z: torch.Tensor, eps: float = 1e-8):
    """(dh, d weight, d bias) of projected_cosine for an upstream dcos (B, N), written out.

    With y = h W^T + bias, a = max(|y|, e), c = max(|z|, e), cos = <y, z> / (a c) and
    g = [|y| >= e] (a clamped norm is a constant, so its term drops, as autograd through
    F.normalize gives):
        dy = dcos * (z / (a c) - g cos y / a^2)      (B, N, Z), float32
        dh = dy W,   d weight = sum over tokens of dy^T h,   d bias = sum over tokens of dy
    Gradients come back in the dtypes of h, weight and bias; d bias is None when bias is.
    This materialises y and dy whole: the kernels compute the same per chunk of tokens.
    """
    e = norm_clamp(eps, h.dtype)
    h32, w32, z32 = _up(h), _up(weight), _up(z.detach())
    y = F.linear(h32, w32, None if bias is None else _up(bias))
    ny, nz = y.norm(dim=-1, keepdim=True), z32.norm(dim=-1, keepdim=True)
    a, c = ny.clamp_min(e), nz.clamp_min(e)
    cos = (y * z32).sum(-1, keepdim=True) / (a * c)
    g = _up(dcos).unsqueeze(-1)
    dy = g * (z32 / (a * c) - torch.where(ny >= e, cos / (a * a), torch.zeros_like(a)) * y)
    dh = (dy @ w32).to(h.dtype)
    dw = dy.reshape(-1, dy.shape[-1]).t() @ h32.reshape(-1, h32.shape[-1])
    db = None if bias is None else dy.reshape(-1, dy.shape[-1]).sum(0).to(bias.dtype)
    return dh, dw.to(weight.dtype), db
