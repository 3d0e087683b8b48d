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
