"""Reference token routing: gather the rows a route keeps, scatter them back. The specification.

Shapes: x (B, N, D), idx (B, K) integer, every row of idx holding K distinct positions in [0, N).
"""
from __future__ import annotations

import torch


def route_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x_sub[b, k] = x[b, idx[b, k]].  (B, N, D), (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def route_scatter(x: torch.Tensor, x_sub: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """Out of place: out = x, then out[b, idx[b, k]] = x_sub[b, k] (zeros where x_sub is None)."""
    if x_sub is None:
        x_sub = x.new_zeros(idx.shape[0], idx.shape[1], x.shape[-1])
    return torch.scatter(x, 1, idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]), x_sub)


def draw_route(batch: int, num_tokens: int, keep: int, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, sort: bool = True) -> torch.Tensor:
    """Per sample, `keep` distinct token positions drawn uniformly without replacement: (B, keep) int64.

    One random permutation per sample (argsort of uniform noise), truncated. Sorted ascending by
    default, so that kept tokens stay in scan order and a keep of N gives the identity.
    """
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    idx = noise.argsort(dim=1)[:, :keep]
    return idx.sort(dim=1).values if sort else idx


def complement(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The positions NOT in idx, per sample, ascending: (B, K) -> (B, N - K) int64."""
    mask = torch.ones(idx.shape[0], num_tokens, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, idx.long(), False)
    return mask.nonzero()[:, 1].view(idx.shape[0], num_tokens - idx.shape[1])


def inverse(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """inv[b, n] = k where idx[b, k] == n, else -1: (B, K) -> (B, N) int64."""
    inv = torch.full((idx.shape[0], num_tokens), -1, dtype=torch.long, device=idx.device)
    src = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
    return inv.scatter_(1, idx.long(), src)
