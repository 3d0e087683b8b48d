"""TREAD token routing over a model's block list: blocks start..end run on the kept tokens only.

    from effkernels import ops
    from effkernels.integrations.tread import apply_tread

    blocks = apply_tread(model, start=2, end=5)          # model.transformer_blocks, in place
    idx = ops.draw_route(B, N, keep=N // 2, generator=g)  # (B, K) kept token positions, drawn outside
    with blocks.route(idx):
        out = model(x, timestep=t, class_labels=y)       # one routed forward (and its backward)
    out_dense = model(x, timestep=t, class_labels=y)     # no route set: the dense model, unchanged

For models whose forward runs `for block in self.<attr>: hidden_states = block(hidden_states, ...)`
with the image tokens (B, N, D) as each block's first argument and only output: diffusers'
DiTTransformer2DModel and PixArtTransformer2DModel (BasicTransformerBlock). Blocks are numbered
1..depth; the route from `start` to `end` (inclusive) gathers the kept tokens before block `start`
(route_gather) and scatters block `end`'s output back into the hidden state it was gathered from
(route_scatter): the routed-over tokens carry their block start-1 state past the route, as TREAD
does. Per-sample conditioning (timestep, class labels, caption tokens for cross-attention) passes
through unchanged. A self-attention mask over the image tokens (attention_mask) cannot be routed and
is an error while a route is set.

The wrapper is an nn.ModuleList subclass holding the same blocks under the same indices, so the
state_dict keys, parameters and optimizers are those of the model without it; remove_tread puts a
plain nn.ModuleList back. It imports only effkernels.ops, no model library.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import ops
from ..backends import BACKENDS


class _Routed:
    """Block `block` of a routed iteration: gathers before it (enter), scatters after it (exit)."""

    def __init__(self, block: nn.Module, state: dict, enter: bool, exit: bool):
        self.block, self.state, self.enter, self.exit = block, state, enter, exit

    def __getattr__(self, name):  # the model's loop may read block attributes (e.g. context_pre_only)
        return getattr(self.block, name)

    def __call__(self, hidden_states, *args, **kwargs):
        st = self.state
        if kwargs.get("attention_mask") is not None or (args and args[0] is not None):
            raise ValueError("attention_mask over the image tokens cannot be routed; unset the route or the mask")
        if self.enter:
            idx = st["idx"]
            if hidden_states.dim() != 3:
                raise ValueError(f"hidden_states must be (B, N, D) at block {st['start']}, got {tuple(hidden_states.shape)}")
            ops.check_route_index(idx, hidden_states.shape[1], batch=hidden_states.shape[0], name="idx")
            st["full"] = hidden_states  # (B, N, D)
            hidden_states = ops.route_gather(hidden_states, idx, backend=st["backend"], check_idx=False)  # (B, K, D)
        out = self.block(hidden_states, *args, **kwargs)
        if self.exit:
            out = ops.route_scatter(st["full"], out, st["idx"], backend=st["backend"], check_idx=False)  # (B, N, D)
        return out


class RoutedBlocks(nn.ModuleList):
    """A block list whose iteration routes blocks start..end (1-based, inclusive) while a route is set.

    Args:
        blocks: the model's blocks (kept, same order and indices).
        start, end: the route, 1 <= start <= end <= len(blocks).
        backend: passed to route_gather / route_scatter (None: the usual selection).
    """

    def __init__(self, blocks, start: int, end: int, *, backend: str | None = None):
        super().__init__(blocks)
        n = len(self)
        for name, v in (("start", start), ("end", end)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 1 <= start <= end <= n:
            raise ValueError(f"need 1 <= start <= end <= {n} (the number of blocks), got start={start}, end={end}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
        self.start, self.end, self.backend = start, end, backend
        self._idx: torch.Tensor | None = None

    def set_route(self, idx: torch.Tensor | None) -> None:
        """Route the following forwards through idx (B, K) int kept positions; None: dense."""
        if idx is not None and not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor or None, got {type(idx).__name__}")
        self._idx = idx

    @contextlib.contextmanager
    def route(self, idx: torch.Tensor):
        """Set the route for the forwards inside the block, dense again after it."""
        prev = self._idx
        self.set_route(idx)
        try:
            yield self
        finally:
            self._idx = prev

    def __iter__(self):
        blocks = list(super().__iter__())
        if self._idx is None:
            return iter(blocks)
        state = {"idx": self._idx, "backend": self.backend, "start": self.start}  # this forward's gather state
        out = list(blocks)
        for i in {self.start, self.end}:
            out[i - 1] = _Routed(blocks[i - 1], state, enter=i == self.start, exit=i == self.end)
        return iter(out)

    def extra_repr(self) -> str:
        return f"route blocks {self.start}..{self.end}"


def apply_tread(model: nn.Module, start: int, end: int, *, attr: str = "transformer_blocks",
                backend: str | None = None) -> RoutedBlocks:
    """Replace model.<attr> (an nn.ModuleList) by a RoutedBlocks over the same blocks; returns it."""
    blocks = getattr(model, attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"model.{attr} must be an nn.ModuleList of blocks, got {type(blocks).__name__}")
    routed = RoutedBlocks(blocks, start, end, backend=backend)
    setattr(model, attr, routed)
    return routed


def remove_tread(model: nn.Module, *, attr: str = "transformer_blocks") -> None:
    """Put a plain nn.ModuleList of the same blocks back in model.<attr>."""
    blocks = getattr(model, attr, None)
    if not isinstance(blocks, RoutedBlocks):
        raise TypeError(f"model.{attr} is not a RoutedBlocks (apply_tread was not called), got {type(blocks).__name__}")
    setattr(model, attr, nn.ModuleList(list(nn.ModuleList.__iter__(blocks))))
