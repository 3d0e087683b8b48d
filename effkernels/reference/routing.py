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
    mask = torch.ones(idx.shape[0], num_tokens, dtype=torch.uint8, device=idx.device)
    mask.scatter_(1, idx.long(), 0)
    # the kept-out positions first, in ascending order (a stable sort); no nonzero(), so the output's
    # shape never depends on the values (torch.compile, the meta device)
    return mask.argsort(dim=1, descending=True, stable=True)[:, :num_tokens - idx.shape[1]]


def inverse(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """inv[b, n] = k where idx[b, k] == n, else -1: (B, K) -> (B, N) int64."""
    inv = torch.full((idx.shape[0], num_tokens), -1, dtype=torch.long, device=idx.device)
    src = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
    return inv.scatter_(1, idx.long(), src)


def segment_expand(v: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-segment rows to per packed row: (S, C), (T,) -> (T, C), row t = v[segment_ids[t]]."""
    return v.index_select(0, segment_ids)


def segment_sum(rows: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """The adjoint of segment_expand for contiguous segments: (T, C) -> (S, C), out[s] = the sum of
    rows cu_seqlens[s]:cu_seqlens[s + 1], in float32 (float64 for float64), returned in rows' dtype.

    Each segment's rows are gathered into a zero-padded (S, max_seqlen, C) block and summed over
    dim 1: a gather and a reduction in a fixed order, so the result is the same bits on every run
    and device. index_select's own backward (index_add) accumulates with atomics on CUDA, whose
    order, and so whose float sum, changes from run to run. max_seqlen must be >= every segment's
    length (as for varlen attention); the padded block costs S * max_seqlen * C elements.
    """
    T, C = rows.shape
    S = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    j = torch.arange(max_seqlen, device=rows.device)
    src = torch.where(j < (cu[1:] - cu[:-1])[:, None], cu[:-1, None] + j, T)  # (S, M); T = the zero row
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    padded = torch.cat([rows.to(acc), rows.new_zeros(1, C, dtype=acc)]).index_select(0, src.view(-1))
    return padded.view(S, max_seqlen, C).sum(1).to(rows.dtype)
