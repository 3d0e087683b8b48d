"""Reference alignment losses (REPA / ERW / SRA). The specification.

z_hat: the projection of a hidden state (B, N, D); z: the target (B, N, D), never differentiated.
Every loss is a float32 scalar: the mean over batch and tokens of a per-token distance.
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


def cosine_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """-mean over batch and tokens of per_token_cosine (REPA's loss)."""
    return -per_token_cosine(z_hat, z, eps).mean()


def smooth_l1_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """Smooth-L1 (Huber, transition at beta) summed over D, mean over tokens and batch (SRA's original)."""
    d = F.smooth_l1_loss(_up(z_hat), _up(z.detach()), beta=beta, reduction="none")
    return d.sum(-1).mean()


def mse_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Squared error summed over D, mean over tokens and batch."""
    return (_up(z_hat) - _up(z.detach())).pow(2).sum(-1).mean()
