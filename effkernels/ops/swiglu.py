"""Public SwiGLU op: silu(a) * b, the elementwise half of a SwiGLU MLP.

a, b: one shape (..., H) (at least 1-D), one dtype and device, unit stride along H, any row strides:
the two halves of one (..., 2H) projection, `fc1(x).chunk(2, -1)`, are read in place (row stride
2H), never copied. The kernel backends see (B, N, H) row views: 1-D and 2-D inputs get leading
dims of size 1; inputs of more than 3 dims have their leading dims merged (a view for every view
of one projection; a copy only where the strides do not merge). The result and the
gradients are contiguous, shaped like a, in a's dtype; arithmetic in float32.

Kernel backend primitives (effkernels._triton.swiglu, effkernels._ext.swiglu):
  swiglu_fwd(a, b, out=None) -> out                      a, b: (B, N, H) row views
  swiglu_bwd(dout, a, b) -> (da, db)                     contiguous (B, N, H)

Forward-mode AD (torch.func.jvp / jacfwd): on every backend; the kernel backends run the same
kernel forward with the analytic tangent of reference.swiglu.swiglu_jvp through ops._forward_ad.rule.
"""
from __future__ import annotations

import torch

from ..reference import swiglu as ref
from . import _forward_ad as fad
from ._common import check_last_dim_contiguous, check_same, check_tensor, kernel_module, pick


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as a (B, N, H) row view: size-1 leading dims added below 3 dims; above, the leading dims
    merged (a view whenever their strides merge, as for every view of one projection; else a copy)."""
    if t.dim() < 3:
        return t[(None,) * (3 - t.dim())]
    return t if t.dim() == 3 else t.reshape(-1, *t.shape[-2:])


def _check(a, b) -> None:
    check_tensor("a", a, floating=True)
    check_tensor("b", b, floating=True)
    for name, t in (("a", a), ("b", b)):
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dim (..., H), got a 0-d tensor")
        check_last_dim_contiguous(name, t)
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    check_same(("a", "b"), (a, b))


@torch.library.custom_op("effkernels::swiglu", mutates_args=())
def _swiglu_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    out = kernel_module("swiglu", backend).swiglu_fwd(_rows(a), _rows(b))
    return out.view(a.shape)


@_swiglu_op.register_fake
def _(a, b, backend):
    return a.new_empty(a.shape)


@torch.library.custom_op("effkernels::swiglu_backward", mutates_args=())
def _swiglu_bwd_op(dout: torch.Tensor, a: torch.Tensor, b: torch.Tensor, backend: str) -> list[torch.Tensor]:
    da, db = kernel_module("swiglu", backend).swiglu_bwd(_rows(dout.contiguous()), _rows(a),
                                                         _rows(b))
    return [da.view(a.shape), db.view(a.shape)]


@_swiglu_bwd_op.register_fake
def _(dout, a, b, backend):
    return [a.new_empty(a.shape), a.new_empty(a.shape)]


def _setup(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _bwd(ctx, dout):
    a, b = ctx.saved_tensors
    fad.forbid_tangents("swiglu (its backward)", dout, a, b)
    da, db = _swiglu_bwd_op(dout, a, b, ctx.backend)
    return da, db, None


_swiglu_op.register_autograd(_bwd, setup_context=_setup)

_rule = fad.rule("swiglu", _swiglu_op, outputs=1,
                 jvp=lambda a, out, d: ref.swiglu_jvp(a[0], a[1], d[0], d[1]),
                 reference=lambda a, b, backend: ref.swiglu(a, b))


def swiglu(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(a) * b elementwise; a, b (..., H), e.g. the two halves of one (..., 2H) projection."""
    _check(a, b)
    be = pick("swiglu", a.device, backend)
    if be == "reference":
        return ref.swiglu(a, b)
    if fad.active():
        return _rule.apply(a, b, be)
    return _swiglu_op(a, b, be)
