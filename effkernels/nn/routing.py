"""Token routing module (TREAD's routes, MaskDiT's kept tokens): draw, gather, scatter back.

A route keeps `N - round(N * ratio)` tokens per sample (the processed ones; the other `ratio`
fraction bypasses the routed blocks), drawn by an independent random permutation per sample and
sorted, so that processed tokens keep their scan order.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._common import check_backend, check_ratio


def keep_count(num_tokens: int, ratio: float) -> int:
    """How many tokens a route with `ratio` keeps (processes) of `num_tokens`: N - round(N * ratio)."""
    keep = num_tokens - round(num_tokens * ratio)
    if keep < 1:
        raise ValueError(f"ratio={ratio} routes every one of the {num_tokens} tokens; keep at least one")
    return keep


class TokenRouter(nn.Module):
    """Gather a random subset of tokens before a span of blocks and put them back after it.

    Args:
        ratio: fraction of tokens routed AROUND the span, in [0, 1). 0 is the identity: no draw,
            no copy, the input tensor itself comes back.
        generator: a torch.Generator on the tokens' device for reproducible draws (None = global RNG).
        backend: passed to effkernels.ops.

    Use:
        x_sub, idx = router(x)               # x (B, N, D) -> x_sub (B, K, D), idx (B, K) int64 or None
        ...blocks on x_sub...
        x = router.restore(x, x_sub, idx, check_idx=False)  # out of place -> (B, N, D)
    Routed tokens come back exactly as they went in (the saved full sequence is not modified).
    gather/restore check an index's values (a host sync, eager only) unless check_idx=False: pass
    False for an index this router drew (valid by construction) or one checked already.
    """

    def __init__(self, ratio: float, generator: torch.Generator | None = None, *, backend: str | None = None):
        super().__init__()
        self.ratio = check_ratio("ratio", ratio)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.backend = check_backend(backend)

    def keep_count(self, num_tokens: int) -> int:
        """How many tokens a sequence of `num_tokens` keeps (processes): N - round(N * ratio)."""
        return keep_count(num_tokens, self.ratio)

    def draw(self, batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """A fresh sorted keep index (B, K) int64, or None when ratio is 0 (nothing routed)."""
        if self.ratio == 0:
            return None
        return ops.draw_route(batch, num_tokens, self.keep_count(num_tokens), generator=self.generator,
                              device=device, sort=True)

    def gather(self, x: torch.Tensor, idx: torch.Tensor | None, *, check_idx: bool = True) -> torch.Tensor:
        """x (B, N, D) -> (B, K, D) rows idx; x itself when idx is None."""
        return x if idx is None else ops.route_gather(x, idx, backend=self.backend, check_idx=check_idx)

    def restore(self, x_full: torch.Tensor, x_sub: torch.Tensor, idx: torch.Tensor | None, *,
                check_idx: bool = True) -> torch.Tensor:
        """x_full with rows idx replaced by x_sub, out of place: -> (B, N, D); x_sub when idx is None."""
        if idx is None:
            return x_sub
        return ops.route_scatter(x_full, x_sub, idx, backend=self.backend, check_idx=check_idx)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (B, N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        idx = self.draw(x.shape[0], x.shape[1], x.device)
        return self.gather(x, idx, check_idx=False), idx

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"


# ---------------------------------------------------------------------------------------------
# Per-sample token budgets: a different count per sample, packed without padding
# ---------------------------------------------------------------------------------------------

def check_ratio_range(name: str, lo, hi) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi < 1, else a ValueError naming `name` (a CLI option or argument)."""
    for v in (lo, hi):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < 1):
            raise ValueError(f"{name} must be A:B with 0 <= A <= B < 1, got {lo!r}:{hi!r}")
    if lo > hi:
        raise ValueError(f"{name} must be A:B with A <= B, got {lo}:{hi}")
    return float(lo), float(hi)


def draw_ratios(batch: int, lo: float, hi: float, *, generator: torch.Generator | None = None,
                device=None) -> list[float]:
    """One ratio per sample, uniform in [lo, hi], from `generator` (on its own device): a host list,
    since the counts it gives are shapes (read once here, outside any compiled region)."""
    dev = generator.device if generator is not None else device
    u = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
    return (lo + (hi - lo) * u).tolist()


class TokenPack:
    """A different number of kept tokens per sample, packed back to back without padding.

    The kept rows of x (B, N, D) are named by flat positions into its (B * N, D) rows, sample-major:
      rows (T,) int64           b * N + n for every kept token n of sample b (ascending n when sorted)
      seg (T,) int64            the sample b each packed row belongs to (broadcasts conditioning)
      cu_seqlens (B + 1,) int32 sample b owns packed rows cu_seqlens[b]:cu_seqlens[b + 1]
      max_seqlen int            the largest count, for the varlen attention
      counts tuple of ints      the count of every sample (host side; nothing in a forward reads it)
    Everything is built on the host before the forward, so a compiled model reads plain tensors and
    one int and never syncs. gather/scatter go through effkernels.ops.route_gather/route_scatter
    with the flat index on x viewed as one (1, B * N, D) sequence, so the packed form reuses the
    routing kernels, their autograd and their duplicate-free contract.
    Build one with TokenPack.draw (random, per-sample counts) or TokenPack.from_indices (checked).
    """

    def __init__(self, rows, seg, cu_seqlens, max_seqlen: int, counts, num_tokens: int):
        self.rows, self.seg, self.cu_seqlens = rows, seg, cu_seqlens
        self.max_seqlen, self.counts, self.num_tokens = int(max_seqlen), tuple(counts), int(num_tokens)
        self.batch = len(self.counts)
        self._weights = None  # token_weights(), built on first use

    @property
    def total(self) -> int:
        """T, the packed rows."""
        return self.rows.shape[0]

    @classmethod
    def _build(cls, rows: torch.Tensor, counts: list[int], num_tokens: int) -> TokenPack:
        dev = rows.device
        c = torch.tensor(counts, dtype=torch.int64)
        cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
        cu[1:] = c.cumsum(0)
        seg = torch.repeat_interleave(torch.arange(len(counts)), c)
        return cls(rows, seg.to(dev), cu.to(dev), max(counts) if counts else 1, counts, num_tokens)

    @classmethod
    def draw(cls, counts, num_tokens: int, *, generator: torch.Generator | None = None, device=None,
             sort: bool = True) -> TokenPack:
        """counts[b] distinct positions of [0, num_tokens) per sample, uniform without replacement.

        One random permutation per sample (argsort of uniform noise, the draw effkernels.ops.draw_route
        makes), truncated to that sample's count; sorted within the sample unless sort=False. With
        every count equal to K this keeps exactly the positions draw_route(B, N, K) keeps from the
        same generator state."""
        counts = [int(k) for k in counts]
        if not counts or any(k < 1 or k > num_tokens for k in counts):
            raise ValueError(f"counts must be a non-empty list of ints in [1, {num_tokens}], got {counts}")
        B, N = len(counts), num_tokens
        noise = torch.rand(B, N, generator=generator, device=device)
        perm = noise.argsort(dim=1)  # (B, N): rank -> position
        k = torch.tensor(counts, device=perm.device)
        take = torch.arange(N, device=perm.device) < k[:, None]  # (B, N) by rank: within the budget
        offset = torch.arange(B, device=perm.device)[:, None] * N
        if sort:
            keep = torch.zeros(B, N, dtype=torch.bool, device=perm.device).scatter_(1, perm, take)
            rows = keep.view(-1).nonzero().view(-1)  # row-major: sample-major, ascending positions
        else:
            rows = (perm + offset)[take]  # sample-major, in draw order
        return cls._build(rows, counts, N)

    @classmethod
    def from_indices(cls, indices, num_tokens: int) -> TokenPack:
        """A pack from one 1-D index per sample (positions in [0, num_tokens), distinct), checked."""
        rows, counts = [], []
        for b, idx in enumerate(indices):
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"indices[{b}] must be a 1-D int32/int64 tensor, got {getattr(idx, 'shape', idx)}")
            if idx.numel() == 0:
                raise ValueError(f"indices[{b}] is empty: every sample keeps at least one token")
            ops.check_route_index(idx.view(1, -1), num_tokens, name=f"indices[{b}]")
            rows.append(idx.long() + b * num_tokens)
            counts.append(idx.numel())
        if not rows:
            raise ValueError("indices must hold one index per sample, got none")
        return cls._build(torch.cat(rows), counts, num_tokens)

    def check(self, batch: int, num_tokens: int, name: str) -> None:
        """Static agreement with x (B, N, ...): no host sync."""
        if self.batch != batch or self.num_tokens != num_tokens:
            raise ValueError(f"{name} packs {self.batch} samples of {self.num_tokens} tokens, "
                             f"but x has {batch} samples of {num_tokens}")

    def gather(self, x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """x (B, N, D) -> the kept rows packed (T, D)."""
        B, N, D = x.shape
        out = ops.route_gather(x.reshape(1, B * N, D), self.rows.view(1, -1), backend=backend, check_idx=False)
        return out.view(-1, D)

    def scatter(self, full: torch.Tensor, sub: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """full (B, N, D) with the kept rows replaced by sub (T, D), out of place: -> (B, N, D)."""
        B, N, D = full.shape
        out = ops.route_scatter(full.reshape(1, B * N, D), sub.reshape(1, -1, D), self.rows.view(1, -1),
                                backend=backend, check_idx=False)
        return out.view(B, N, D)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample rows (B, C) -> per packed row (T, C): row t gets v[seg[t]]; v's gradient sums
        each sample's rows in a fixed order (ops.segment_expand: deterministic on CUDA too)."""
        return ops.segment_expand(v, self.seg, self.cu_seqlens, self.max_seqlen)

    def token_weights(self) -> torch.Tensor:
        """(T,) float32: 1 / (B * count of the row's sample). A per-token loss summed with these
        weights is the mean over samples of each sample's mean over its own kept tokens: the
        weighting a fixed count K gives (1 / (B K) per token), with a count per sample."""
        if self._weights is None:
            c = torch.tensor(self.counts, dtype=torch.float32, device=self.rows.device)
            self._weights = (1.0 / (self.batch * c)).index_select(0, self.seg)
        return self._weights

    def mask(self, dtype=torch.float32) -> torch.Tensor:
        """(B, N): 1 where a token is kept, 0 elsewhere."""
        B, N = self.batch, self.num_tokens
        zeros = torch.zeros(1, B * N, 1, dtype=dtype, device=self.rows.device)
        ones = torch.ones(1, self.total, 1, dtype=dtype, device=self.rows.device)
        return ops.route_scatter(zeros, ones, self.rows.view(1, -1), check_idx=False).view(B, N)

    def __repr__(self) -> str:
        return f"TokenPack(batch={self.batch}, num_tokens={self.num_tokens}, counts={list(self.counts)})"
