"""Public adaLN ops: modulate_layernorm, gated_residual and the fused residual + LN + modulate.

x, y: (B, N, D), unit stride along D. shift, scale, gate: per sample (B, D) or per token (B, N, D),
any row strides (the chunks of adaLN(c).chunk(6, -1) are taken as they are, never copied), unit
stride along D. weight, bias: (D,) or None. All float tensors share x's dtype.

Kernel backend primitives (effkernels._triton.adaln, effkernels._ext.adaln); statistics float32:
  ln_modulate_fwd(x, shift, scale, weight, bias, eps, out=None) -> (out, mean (B, N) f32, rstd (B, N) f32)
  ln_modulate_bwd(dout, x, shift, scale, weight, bias, mean, rstd)
      -> (dx, dshift, dscale, dweight, dbias); dshift/dscale shaped like shift/scale, dweight/dbias
         None when weight/bias are None. Reductions over rows go through float32 partial buffers.
  gated_residual_fwd(x, y, gate, out=None) -> out
  gated_residual_bwd(dout, y, gate) -> (dy, dgate)           (dx is dout itself)
  fused_fwd(x, y, gate, shift, scale, weight, bias, eps) -> (h, out, mean, rstd)
  fused_bwd(dh, dout, h, y, gate, shift, scale, weight, bias, mean, rstd)
      -> (dx, dy, dgate, dshift, dscale, dweight, dbias)

Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad): all three ops, on every
backend. The reference backend is plain torch; the kernel backends run the same kernel forward
with the analytic tangent of reference.jvp (statistics in float32) through ops._forward_ad.rule.
"""
from __future__ import annotations

import torch

from ..reference import adaln as ref
from ..reference import jvp as ref_jvp
from . import _forward_ad as fad
from ._common import check_eps, check_last_dim_contiguous, check_same, check_tensor, kernel_module, pick


def _check_mod(name: str, m, x: torch.Tensor) -> None:
    check_tensor(name, m, dims=(2, 3), floating=True)
    B, N, D = x.shape
    ok = tuple(m.shape) == (B, D) or tuple(m.shape) == (B, N, D)
    if not ok:
        raise ValueError(f"{name} must have shape (B, D)={(B, D)} or (B, N, D)={(B, N, D)}, got {tuple(m.shape)}")
    check_last_dim_contiguous(name, m)


def _check_affine(name: str, p, x: torch.Tensor) -> None:
    if p is None:
        return
    check_tensor(name, p, dims=(1,), floating=True)
    if p.shape[0] != x.shape[-1]:
        raise ValueError(f"{name} must have shape (D,)=({x.shape[-1]},), got {tuple(p.shape)}")


def _check_x(name: str, x) -> None:
    check_tensor(name, x, dims=(3,), floating=True)
    check_last_dim_contiguous(name, x)


def _check_ln(x, shift, scale, weight, bias, eps):
    _check_x("x", x)
    _check_mod("shift", shift, x)
    _check_mod("scale", scale, x)
    _check_affine("weight", weight, x)
    _check_affine("bias", bias, x)
    check_same(("x", "shift", "scale", "weight", "bias"), (x, shift, scale, weight, bias))
    return check_eps(eps)


def _check_residual(x, y, gate):
    _check_x("x", x)
    _check_x("y", y)
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    _check_mod("gate", gate, x)
    check_same(("x", "y", "gate"), (x, y, gate))


def _none_if_empty(t):
    return None if t.numel() == 0 else t


def _empty_if_none(t, like):
    return like.new_empty(0) if t is None else t


# ---------------------------------------------------------------------------------------------
# LayerNorm + modulate
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("effkernels::modulate_layernorm", mutates_args=())
def _ln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
           bias: torch.Tensor | None, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel_module("adaln", backend).ln_modulate_fwd(x, shift, scale, weight, bias, eps)


@_ln_op.register_fake
def _(x, shift, scale, weight, bias, eps, backend):
    B, N, _ = x.shape
    return torch.empty_like(x), x.new_empty(B, N, dtype=torch.float32), x.new_empty(B, N, dtype=torch.float32)


@torch.library.custom_op("effkernels::modulate_layernorm_backward", mutates_args=())
def _ln_bwd_op(dout: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
               weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
               rstd: torch.Tensor, backend: str) -> list[torch.Tensor]:
    dx, dshift, dscale, dw, db = kernel_module("adaln", backend).ln_modulate_bwd(
        dout.contiguous(), x, shift, scale, weight, bias, mean, rstd)
    return [dx, dshift, dscale, _empty_if_none(dw, x), _empty_if_none(db, x)]


@_ln_bwd_op.register_fake
def _(dout, x, shift, scale, weight, bias, mean, rstd, backend):
    return [torch.empty_like(x), shift.new_empty(shift.shape), scale.new_empty(scale.shape),
            x.new_empty(0) if weight is None else torch.empty_like(weight),
            x.new_empty(0) if bias is None else torch.empty_like(bias)]


def _ln_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, weight, bias, mean, rstd)
    ctx.backend = backend


def _ln_bwd(ctx, dout, _dmean, _drstd):
    x, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    fad.forbid_tangents("modulate_layernorm (its backward)", dout, x, shift, scale, weight, bias)
    dx, dshift, dscale, dw, db = _ln_bwd_op(dout, x, shift, scale, weight, bias, mean, rstd, ctx.backend)
    return dx, dshift, dscale, _none_if_empty(dw), _none_if_empty(db), None, None


_ln_op.register_autograd(_ln_bwd, setup_context=_ln_setup)

_ln_rule = fad.rule(
    "modulate_layernorm", _ln_op, outputs=1,
    jvp=lambda a, out, d: ref_jvp.modulate_layernorm_jvp(*a[:3], a[5], a[3], a[4], *d[:5]),  # eps before weight
    reference=lambda x, shift, scale, weight, bias, eps, backend: ref.modulate_layernorm(
        x, shift, scale, eps, weight, bias))


def modulate_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                       backend: str | None = None) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift; shift/scale (B, D) broadcast over tokens or (B, N, D) per token."""
    eps = _check_ln(x, shift, scale, weight, bias, eps)
    b = pick("modulate_layernorm", x.device, backend)
    if b == "reference":
        return ref.modulate_layernorm(x, shift, scale, eps, weight, bias)
    if fad.active():
        return _ln_rule.apply(x, shift, scale, weight, bias, eps, b)[0]
    return _ln_op(x, shift, scale, weight, bias, eps, b)[0]


# ---------------------------------------------------------------------------------------------
# Gated residual
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("effkernels::gated_residual", mutates_args=())
def _gr_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str) -> torch.Tensor:
    return kernel_module("adaln", backend).gated_residual_fwd(x, y, gate)


@_gr_op.register_fake
def _(x, y, gate, backend):
    return torch.empty_like(x)


@torch.library.custom_op("effkernels::gated_residual_backward", mutates_args=())
def _gr_bwd_op(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str) -> list[torch.Tensor]:
    return list(kernel_module("adaln", backend).gated_residual_bwd(dout.contiguous(), y, gate))


@_gr_bwd_op.register_fake
def _(dout, y, gate, backend):
    return [torch.empty_like(y), gate.new_empty(gate.shape)]


def _gr_setup(ctx, inputs, output):
    x, y, gate, backend = inputs
    ctx.save_for_backward(y, gate)
    ctx.backend = backend


def _gr_bwd(ctx, dout):
    y, gate = ctx.saved_tensors
    fad.forbid_tangents("gated_residual (its backward)", dout, y, gate)
    dy, dgate = _gr_bwd_op(dout, y, gate, ctx.backend)
    return dout, dy, dgate, None


_gr_op.register_autograd(_gr_bwd, setup_context=_gr_setup)

_gr_rule = fad.rule("gated_residual", _gr_op, outputs=1,
                    jvp=lambda a, out, d: ref_jvp.gated_residual_jvp(*a[:3], *d[:3]),
                    reference=lambda x, y, gate, backend: ref.gated_residual(x, y, gate))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *,
                   backend: str | None = None) -> torch.Tensor:
    """x + gate * y; gate (B, D) broadcast over tokens or (B, N, D) per token."""
    _check_residual(x, y, gate)
    b = pick("gated_residual", x.device, backend)
    if b == "reference":
        return ref.gated_residual(x, y, gate)
    if fad.active():
        return _gr_rule.apply(x, y, gate, b)
    return _gr_op(x, y, gate, b)


# ---------------------------------------------------------------------------------------------
# Fused residual add + LayerNorm + modulate
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("effkernels::gated_residual_modulate_layernorm", mutates_args=())
def _fused_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
              scale: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel_module("adaln", backend).fused_fwd(x, y, gate, shift, scale, weight, bias, eps)


@_fused_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps, backend):
    B, N, _ = x.shape
    stat = x.new_empty(B, N, dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.custom_op("effkernels::gated_residual_modulate_layernorm_backward", mutates_args=())
def _fused_bwd_op(dh: torch.Tensor, dout: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                  gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                  rstd: torch.Tensor, backend: str) -> list[torch.Tensor]:
    dx, dy, dgate, dshift, dscale, dw, db = kernel_module("adaln", backend).fused_bwd(
        dh.contiguous(), dout.contiguous(), h, y, gate, shift, scale, weight, bias, mean, rstd)
    return [dx, dy, dgate, dshift, dscale, _empty_if_none(dw, h), _empty_if_none(db, h)]


@_fused_bwd_op.register_fake
def _(dh, dout, h, y, gate, shift, scale, weight, bias, mean, rstd, backend):
    return [torch.empty_like(h), torch.empty_like(y), gate.new_empty(gate.shape),
            shift.new_empty(shift.shape), scale.new_empty(scale.shape),
            h.new_empty(0) if weight is None else torch.empty_like(weight),
            h.new_empty(0) if bias is None else torch.empty_like(bias)]


def _fused_setup(ctx, inputs, output):
    x, y, gate, shift, scale, weight, bias, eps, backend = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, y, gate, shift, scale, weight, bias, mean, rstd)
    ctx.backend = backend


def _fused_bwd(ctx, dh, dout, _dmean, _drstd):
    h, y, gate, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    fad.forbid_tangents("gated_residual_modulate_layernorm (its backward)", dh, dout, h, y, gate, shift, scale,
                        weight, bias)
    dh = torch.zeros_like(h) if dh is None else dh
    dout = torch.zeros_like(h) if dout is None else dout
    dx, dy, dgate, dshift, dscale, dw, db = _fused_bwd_op(
        dh, dout, h, y, gate, shift, scale, weight, bias, mean, rstd, ctx.backend)
    return dx, dy, dgate, dshift, dscale, _none_if_empty(dw), _none_if_empty(db), None, None


_fused_op.register_autograd(_fused_bwd, setup_context=_fused_setup)

_fused_rule = fad.rule(
    "gated_residual_modulate_layernorm", _fused_op, outputs=2,
    jvp=lambda a, out, d: ref_jvp.gated_residual_modulate_layernorm_jvp(*a[:5], a[7], a[5], a[6], *d[:7],
                                                                         h=out[0]),
    reference=lambda x, y, gate, shift, scale, weight, bias, eps, backend: ref.gated_residual_modulate_layernorm(
        x, y, gate, shift, scale, eps, weight, bias))


def gated_residual_modulate_layernorm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                                      shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                                      weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                                      *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, LN(h) * (1 + scale) + shift) with h = x + gate * y, in one pass over x and y."""
    _check_residual(x, y, gate)
    eps = _check_ln(x, shift, scale, weight, bias, eps)
    b = pick("gated_residual_modulate_layernorm", x.device, backend)
    if b == "reference":
        return ref.gated_residual_modulate_layernorm(x, y, gate, shift, scale, eps, weight, bias)
    op = _fused_rule.apply if fad.active() else _fused_op
    h, out, _, _ = op(x, y, gate, shift, scale, weight, bias, eps, b)
    return h, out
