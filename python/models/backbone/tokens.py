"""Tokens: the token states a span of blocks sees, and what travels with them.

One type for every token plan of DiT.forward: the dense sequence, MaskDiT's kept tokens (a (B, K)
keep index), TREAD's routed tokens (a route's (B, K') index) and packed per-sample budgets (a
TokenPack). A selection is one of
  None                  every token (nothing is copied)
  (B, K) int tensor     K positions per sample, distinct, checked beforehand
  TokenPack             a count per sample, the kept rows packed back to back (T, D)
and Tokens.select / Tokens.restore move the states, their grid positions (for RoPE) and the pack
(for varlen attention and per-sample conditioning) together, so a span of blocks on a selection
equals those blocks run on the selected tokens alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from effkernels import ops
from effkernels.nn.routing import TokenPack


@dataclass(frozen=True)
class Tokens:
    """h: the states, (B, N, D) dense or (B, K, D) selected, or (T, D) a pack's rows.
    pos: their (row, column) grid positions for the rotary embedding: (N, 2) shared by every
        sample, (B, K, 2) per sample, (T, 2) packed; None when the blocks use no RoPE.
    pack: the TokenPack the rows belong to (the blocks then attend within each sample and
        broadcast each sample's conditioning to its rows), else None.
    sel: how these tokens were taken from the sequence they restore into (None: they are it)."""
    h: torch.Tensor
    pos: torch.Tensor | None = None
    pack: TokenPack | None = None
    sel: torch.Tensor | TokenPack | None = None

    def select(self, sel, backend: str | None = None) -> Tokens:
        """The tokens `sel` names, with their positions gathered by the same index. Index values
        are checked before (check_idx=False): DiT.forward checks what it did not draw itself."""
        if sel is None:
            return replace(self, sel=None)
        if isinstance(sel, TokenPack):
            h = sel.gather(self.h, backend=backend)  # (T, D)
            return Tokens(h, _pack_positions(self.pos, sel), sel, sel)
        h = ops.route_gather(self.h, sel, backend=backend, check_idx=False)  # (B, K, D)
        return Tokens(h, _index_positions(self.pos, sel), self.pack, sel)

    def restore(self, outer: Tokens, backend: str | None = None) -> Tokens:
        """outer (the tokens select was called on) with these states written back where they were
        taken from, out of place; outer's positions and pack."""
        if self.sel is None:
            return replace(outer, h=self.h)
        if isinstance(self.sel, TokenPack):
            return replace(outer, h=self.sel.scatter(outer.h, self.h, backend=backend))
        return replace(outer, h=ops.route_scatter(outer.h, self.h, self.sel, backend=backend, check_idx=False))

    def with_states(self, h: torch.Tensor) -> Tokens:
        """The same tokens with new states (a block's output)."""
        return replace(self, h=h)


def _index_positions(pos: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    # (N, 2) shared or (B, N, 2) -> (B, K, 2)
    if pos is None:
        return None
    if pos.dim() == 2:
        return pos[idx]
    return torch.gather(pos, 1, idx.unsqueeze(-1).expand(-1, -1, 2))


def _pack_positions(pos: torch.Tensor | None, pack: TokenPack) -> torch.Tensor | None:
    # (N, 2) shared or (B, N, 2) -> (T, 2); pack rows are b * N + n
    if pos is None:
        return None
    if pos.dim() == 2:
        return pos.index_select(0, pack.rows % pack.num_tokens)
    return pos.reshape(-1, 2).index_select(0, pack.rows)
