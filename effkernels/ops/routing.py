"""Public token-routing ops: route_gather / route_scatter with validation, dispatch and autograd.

x (B, N, D) float; idx (B, K) int32/int64, each row K distinct positions in [0, N), K <= N.
  route_gather(x, idx)          -> (B, K, D)   x_sub[b, k] = x[b, idx[b, k]]
  route_scatter(x, x_sub, idx)  -> (B, N, D)   x with rows idx[b, k] replaced by x_sub[b, k]
Backward of gather scatters into zeros; backward of scatter gathers d(x_sub) from the rows it wrote
and passes d(x) with those rows zeroed. Duplicate indices are rejected, never summed.

Kernel backend primitives (effkernels._triton.routing, effkernels._ext.routing):
  gather(x, idx, out=None) -> (B, K, D)
  scatter(x, x_sub, idx, num_tokens, out=None) -> (B, N, D); x None means zeros, x_sub None means
      zero rows. x, x_sub contiguous; idx contiguous int32/int64.
"""
from __future__ import annotations

import torch

from ..reference import routing as ref
from ._common import check_same, check_tensor, data_checks_enabled, kernel_module, pick

draw_route = ref.draw_route
complement = ref.complement
inverse = ref.inverse


def _check_args(x, idx, x_sub=None):
    check_tensor("x", x, dims=(3,), floating=True)
    check_tensor("idx", idx, dims=(2,), integer=True)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx has batch {idx.shape[0]} but x has batch {x.shape[0]}")
    if idx.shape[1] > x.shape[1]:
        raise ValueError(f"idx selects K={idx.shape[1]} tokens but x has only N={x.shape[1]}")
    check_same(("x", "idx"), (x, idx), dtype=False)
    if x_sub is not None:
        check_tensor("x_sub", x_sub, dims=(3,), floating=True)
        want = (x.shape[0], idx.shape[1], x.shape[2])
        if tuple(x_sub.shape) != want:
            raise ValueError(f"x_sub must have shape {want} (B, K, D), got {tuple(x_sub.shape)}")
        check_same(("x", "x_sub"), (x, x_sub))


def check_index_values(idx: torch.Tensor, num_tokens: int) -> None:
    """Data-dependent checks (host sync): every index in [0, N) and no duplicates in a row."""
    if not data_checks_enabled() or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_tokens:
        raise ValueError(f"idx values must lie in [0, {num_tokens}), got range [{lo}, {hi}]")
    s = idx.sort(dim=1).values
    if bool((s[:, 1:] == s[:, :-1]).any()):
        raise ValueError("idx has a duplicate position in some row; routing indices must be distinct")


# ---------------------------------------------------------------------------------------------
# Registered ops: the backend is a plain string argument so torch.compile sees a constant.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("effkernels::route_gather", mutates_args=())
def _gather_op(x: torch.Tensor, idx: torch.Tensor, backend: str) -> torch.Tensor:
    check_index_values(idx, x.shape[1])
    return kernel_module("routing", backend).gather(x.contiguous(), idx.contiguous())


@_gather_op.register_fake
def _(x, idx, backend):
    return x.new_empty(idx.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("effkernels::route_scatter", mutates_args=())
def _scatter_op(x: torch.Tensor | None, x_sub: torch.Tensor | None, idx: torch.Tensor,
                num_tokens: int, backend: str) -> torch.Tensor:
    check_index_values(idx, num_tokens)
    mod = kernel_module("routing", backend)
    return mod.scatter(None if x is None else x.contiguous(),
                       None if x_sub is None else x_sub.contiguous(), idx.contiguous(), num_tokens)


@_scatter_op.register_fake
def _(x, x_sub, idx, num_tokens, backend):
    like = x if x is not None else x_sub
    return like.new_empty(idx.shape[0], num_tokens, like.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx, backend = inputs
    ctx.save_for_backward(idx)
    ctx.num_tokens, ctx.backend = x.shape[1], backend


def _gather_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _scatter_op(None, grad, idx, ctx.num_tokens, ctx.backend), None, None


_gather_op.register_autograd(_gather_bwd, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    x, x_sub, idx, num_tokens, backend = inputs
    ctx.save_for_backward(idx)
    ctx.num_tokens, ctx.backend = num_tokens, backend


def _scatter_bwd(ctx, grad):
    # A None input (zeros) gets no gradient: autograd rejects one for a non-tensor input.
    (idx,) = ctx.saved_tensors
    need_x, need_sub = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_sub = _gather_op(grad, idx, ctx.backend) if need_sub else None
    dx = _scatter_op(grad, None, idx, ctx.num_tokens, ctx.backend) if need_x else None
    return dx, d_sub, None, None, None


_scatter_op.register_autograd(_scatter_bwd, setup_context=_scatter_setup)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def route_gather(x: torch.Tensor, idx: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rows idx of every sample: (B, N, D), (B, K) -> (B, K, D)."""
    _check_args(x, idx)
    b = pick("route_gather", x.device, backend)
    if b == "reference":
        if not torch.compiler.is_compiling():
            check_index_values(idx, x.shape[1])
        return ref.route_gather(x, idx)
    return _gather_op(x, idx, b)


def route_scatter(x: torch.Tensor, x_sub: torch.Tensor, idx: torch.Tensor, *,
                  backend: str | None = None) -> torch.Tensor:
    """x with rows idx of every sample replaced by x_sub, out of place: -> (B, N, D)."""
    _check_args(x, idx, x_sub)
    b = pick("route_scatter", x.device, backend)
    if b == "reference":
        if not torch.compiler.is_compiling():
            check_index_values(idx, x.shape[1])
        return ref.route_scatter(x, x_sub, idx)
    return _scatter_op(x, x_sub, idx, x.shape[1], b)
