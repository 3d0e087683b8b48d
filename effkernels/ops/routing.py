"""Public token-routing ops: route_gather / route_scatter with validation, dispatch and autograd.

x (B, N, D) float; idx (B, K) int32/int64, each row K distinct positions in [0, N), K <= N.
  route_gather(x, idx)          -> (B, K, D)   x_sub[b, k] = x[b, idx[b, k]]
  route_scatter(x, x_sub, idx)  -> (B, N, D)   x with rows idx[b, k] replaced by x_sub[b, k]
Backward of gather scatters into zeros; backward of scatter gathers d(x_sub) from the rows it wrote
and passes d(x) with those rows zeroed. Duplicate indices are rejected, never summed: the public
functions check an index's values once, in eager mode (check_route_index), never inside the ops or
their backward; check_idx=False skips even that for an index drawn here or checked already.

Kernel backend primitives (effkernels._triton.routing, effkernels._ext.routing):
  gather(x, idx, out=None) -> (B, K, D)
  scatter(x, x_sub, idx, num_tokens, out=None) -> (B, N, D); x None means zeros, x_sub None means
      zero rows. x, x_sub contiguous; idx contiguous int32/int64.

Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad): route_gather, route_scatter
and segment_expand, on every backend. They are linear in the rows they move, so the tangent is the
same movement of the tangents (reference math; the kernel backends keep their kernel forward
through ops._forward_ad.rule). draw_route, complement and inverse return indices: no tangent.
"""
from __future__ import annotations

import torch

from ..reference import routing as ref
from . import _forward_ad as fad
from ._common import check_same, check_tensor, data_checks_enabled, kernel_module, pick

complement = ref.complement
inverse = ref.inverse


def _count(name: str, v, lo: int, hi: int | None = None) -> int:
    # bool is an int to Python but never a count; __index__ admits numpy and torch integers.
    if isinstance(v, bool) or not hasattr(type(v), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an int in [{lo}, {'inf' if hi is None else hi}], got {v}")
    return v


def draw_route(batch: int, num_tokens: int, keep: int, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, sort: bool = True) -> torch.Tensor:
    """Per sample, `keep` distinct positions in [0, num_tokens), uniform: (batch, keep) int64.

    See reference.routing.draw_route. The index is valid by construction, so the ops that take it
    can skip the host-syncing value check (check_idx=False)."""
    batch = _count("batch", batch, 0)
    num_tokens = _count("num_tokens", num_tokens, 0)
    keep = _count("keep", keep, 0, num_tokens)
    return ref.draw_route(batch, num_tokens, keep, generator=generator, device=device, sort=sort)


def _check_args(x, idx, x_sub=None):
    check_tensor("x", x, dims=(3,), floating=True)
    _check_index_static(idx, x.shape[1], x.shape[0], "idx")
    check_same(("x", "idx"), (x, idx), dtype=False)
    if x_sub is not None:
        check_tensor("x_sub", x_sub, dims=(3,), floating=True)
        want = (x.shape[0], idx.shape[1], x.shape[2])
        if tuple(x_sub.shape) != want:
            raise ValueError(f"x_sub must have shape {want} (B, K, D), got {tuple(x_sub.shape)}")
        check_same(("x", "x_sub"), (x, x_sub))


def _check_index_static(idx, num_tokens: int, batch: int | None, name: str) -> None:
    check_tensor(name, idx, dims=(2,), integer=True)
    if batch is not None and idx.shape[0] != batch:
        raise ValueError(f"{name} has batch {idx.shape[0]} but x has batch {batch}")
    if idx.shape[1] > num_tokens:
        raise ValueError(f"{name} selects K={idx.shape[1]} tokens but x has only N={num_tokens}")


def check_index_values(idx: torch.Tensor, num_tokens: int, name: str = "idx") -> None:
    """Every index in [0, N) and no duplicate in a row: one host sync (more only to word an error)."""
    if idx.numel() == 0:
        return
    s = idx.sort(dim=1).values
    bad = (s[:, 0] < 0).any() | (s[:, -1] >= num_tokens).any() | (s[:, 1:] == s[:, :-1]).any()
    if not bool(bad):
        return
    lo, hi = int(s[:, 0].min()), int(s[:, -1].max())
    if lo < 0 or hi >= num_tokens:
        raise ValueError(f"{name} values must lie in [0, {num_tokens}), got range [{lo}, {hi}]")
    raise ValueError(f"{name} has a duplicate position in some row; routing indices must be distinct")


def check_route_index(idx: torch.Tensor, num_tokens: int, *, batch: int | None = None,
                      name: str = "idx") -> None:
    """Check a routing index a user passes in, once, before the ops that share it.

    Static part (always, free under torch.compile): a (B, K) int32/int64 tensor, K <= num_tokens,
    B == batch when given. Value part (eager only; skipped while torch.compile traces, and when
    EFFKERNELS_CHECK_INDICES=0): every value in [0, num_tokens), no duplicate in a row. The value
    part reads the index on the host (a sync), which is why the registered ops never run it: check
    once here, then call route_gather/route_scatter with check_idx=False. Errors name `name`.
    """
    _check_index_static(idx, num_tokens, batch, name)
    if torch.compiler.is_compiling() or not data_checks_enabled() or idx.numel() == 0:
        return
    check_index_values(idx, num_tokens, name)


# ---------------------------------------------------------------------------------------------
# Registered ops: the backend is a plain string argument so torch.compile sees a constant. They
# trust idx (the public functions check it, once): a check here would sync with the host on every
# call, forward and backward, and inside compiled graphs.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("effkernels::route_gather", mutates_args=())
def _gather_op(x: torch.Tensor, idx: torch.Tensor, backend: str) -> torch.Tensor:
    return kernel_module("routing", backend).gather(x.contiguous(), idx.contiguous())


@_gather_op.register_fake
def _(x, idx, backend):
    return x.new_empty(idx.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("effkernels::route_scatter", mutates_args=())
def _scatter_op(x: torch.Tensor | None, x_sub: torch.Tensor | None, idx: torch.Tensor,
                num_tokens: int, backend: str) -> torch.Tensor:
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
    fad.forbid_tangents("route_gather (its backward)", grad)
    return _scatter_op(None, grad, idx, ctx.num_tokens, ctx.backend), None, None


_gather_op.register_autograd(_gather_bwd, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    x, x_sub, idx, num_tokens, backend = inputs
    ctx.save_for_backward(idx)
    ctx.num_tokens, ctx.backend = num_tokens, backend


def _scatter_bwd(ctx, grad):
    # A None input (zeros) gets no gradient: autograd rejects one for a non-tensor input.
    (idx,) = ctx.saved_tensors
    fad.forbid_tangents("route_scatter (its backward)", grad)
    need_x, need_sub = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_sub = _gather_op(grad, idx, ctx.backend) if need_sub else None
    dx = _scatter_op(grad, None, idx, ctx.num_tokens, ctx.backend) if need_x else None
    return dx, d_sub, None, None, None


_scatter_op.register_autograd(_scatter_bwd, setup_context=_scatter_setup)


def _scatter_ref(x, x_sub, idx, num_tokens, backend):
    """The registered scatter's semantics in plain torch (x None: zeros; x_sub None: zero rows)."""
    if x is None:
        like = x_sub
        x = like.new_zeros(idx.shape[0], num_tokens, like.shape[2])
    return ref.route_scatter(x, x_sub, idx)


_gather_rule = fad.rule("route_gather", _gather_op,
                        jvp=lambda a, out, d: ref.route_gather(d[0], a[1]),
                        reference=lambda x, idx, backend: ref.route_gather(x, idx))
_scatter_rule = fad.rule("route_scatter", _scatter_op,
                         jvp=lambda a, out, d: _scatter_ref(d[0], d[1], *a[2:]),
                         reference=_scatter_ref)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def route_gather(x: torch.Tensor, idx: torch.Tensor, *, backend: str | None = None,
                 check_idx: bool = True) -> torch.Tensor:
    """Rows idx of every sample: (B, N, D), (B, K) -> (B, K, D).

    check_idx: check idx's values first (check_route_index; eager only, a host sync). Pass False
    for an index drawn by draw_route or already checked, e.g. one shared by many calls."""
    _check_args(x, idx)
    if check_idx:
        check_route_index(idx, x.shape[1])
    b = pick("route_gather", x.device, backend)
    if b == "reference":
        return ref.route_gather(x, idx)
    return (_gather_rule.apply if fad.active() else _gather_op)(x, idx, b)


def route_scatter(x: torch.Tensor, x_sub: torch.Tensor, idx: torch.Tensor, *,
                  backend: str | None = None, check_idx: bool = True) -> torch.Tensor:
    """x with rows idx of every sample replaced by x_sub, out of place: -> (B, N, D).

    check_idx: as for route_gather."""
    _check_args(x, idx, x_sub)
    if check_idx:
        check_route_index(idx, x.shape[1])
    b = pick("route_scatter", x.device, backend)
    if b == "reference":
        return ref.route_scatter(x, x_sub, idx)
    return (_scatter_rule.apply if fad.active() else _scatter_op)(x, x_sub, idx, x.shape[1], b)


# ---------------------------------------------------------------------------------------------
# Per-segment broadcast for packed rows (per-sample token budgets): conditioning per sample
# ---------------------------------------------------------------------------------------------

class _SegmentExpand(torch.autograd.Function):
    """index_select forward; the backward sums each segment's rows in a fixed order (ref.segment_sum)
    instead of index_select's atomic index_add, so gradients are deterministic on CUDA too."""

    @staticmethod
    def forward(ctx, v, segment_ids, cu_seqlens, max_seqlen):
        ctx.save_for_backward(cu_seqlens)
        ctx.max_seqlen = max_seqlen
        return ref.segment_expand(v, segment_ids)

    @staticmethod
    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return ref.segment_sum(grad, cu_seqlens, ctx.max_seqlen), None, None, None


class _SegmentExpandJvp(torch.autograd.Function):
    """_SegmentExpand with a forward-mode rule, used while forward AD is open (dynamo cannot trace
    a Function with a jvp, so the plain path keeps the one above): the tangent is the tangent's
    rows index_select-ed the same way; the backward is _SegmentExpand's."""
    generate_vmap_rule = True

    @staticmethod
    def forward(v, segment_ids, cu_seqlens, max_seqlen):
        return ref.segment_expand(v, segment_ids)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, segment_ids, cu_seqlens, max_seqlen = inputs
        ctx.save_for_backward(cu_seqlens)
        ctx.save_for_forward(segment_ids)
        ctx.max_seqlen = max_seqlen

    @staticmethod
    def jvp(ctx, dv, *_):
        (segment_ids,) = ctx.saved_tensors
        return ref.segment_expand(dv, segment_ids)

    backward = staticmethod(_SegmentExpand.backward)


def segment_expand(v: torch.Tensor, segment_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                   max_seqlen: int) -> torch.Tensor:
    """Per-sample rows v (S, C) to per packed row (T, C): row t takes v[segment_ids[t]].

    The packed form of effkernels.nn.routing.TokenPack: segment_ids (T,) ascending (sample-major),
    cu_seqlens (S + 1,) int32/int64 its segment bounds, max_seqlen an int >= every segment's length.
    The gradient of v is each segment's rows summed in a fixed order (deterministic on every device).
    Shapes, dtypes and devices are checked; the index values are not (no host sync): they come
    from a TokenPack, built valid on the host.
    """
    check_tensor("v", v, dims=(2,), floating=True)
    for name, t in (("segment_ids", segment_ids), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {getattr(t, 'shape', type(t).__name__)}"
                             f"{'' if not isinstance(t, torch.Tensor) else ' ' + str(t.dtype)}")
        check_same(("v", name), (v, t), dtype=False)
    if cu_seqlens.numel() != v.shape[0] + 1:
        raise ValueError(f"cu_seqlens must have S + 1 = {v.shape[0] + 1} entries for v's {v.shape[0]} rows, "
                         f"got {cu_seqlens.numel()}")
    max_seqlen = _count("max_seqlen", max_seqlen, 1 if segment_ids.numel() else 0)
    fn = _SegmentExpandJvp if fad.active() else _SegmentExpand
    return fn.apply(v, segment_ids, cu_seqlens, max_seqlen)
