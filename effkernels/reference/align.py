"""Reference alignment losses (REPA / ERW / SRA). The specification.

z_hat: the projection of a hidden state (B, N, D); z: the target (B, N, D), never differentiated.
Every loss is a float32 scalar: the mean over batch and tokens of a per-token distance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _up


def per_token_cosine(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(z_hat[b,n], z[b,n]) over D: (B, N, D) x2 -> (B, N), both L2-normalised in float32.

    Norms are clamped below at eps (F.normalize's rule) so a zero row gives cos 0, not NaN.
    """
    zh = F.normalize(_up(z_hat), dim=-1, eps=eps)
    zt = F.normalize(_up(z.detach()), dim=-1, eps=eps)
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
