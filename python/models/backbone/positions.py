"""Fixed 2-D sin-cos position embeddings (MAE's, as DiT uses them): (grid**2, D) float tables."""
from __future__ import annotations

import torch


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) float64: [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-2i/embed_dim)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, embed_dim) float32 for a square grid, tokens in row-major order.

    The first half of the features encodes the column, the second half the row (the order the
    official DiT embedding uses, so our table equals the one stored in its checkpoints).
    """
    n = torch.arange(grid_size * grid_size)
    rows, cols = n // grid_size, n % grid_size
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                     get_1d_sincos_pos_embed(embed_dim // 2, rows)], dim=1)
    return emb.float()
