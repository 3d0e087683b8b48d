"""Public RMSNorm ops: rmsnorm_modulate and the fused gated residual + RMSNorm + modulate.

x, y: (B, N, D), unit stride along D. shift, scale, gate: per sample (B, D) or per token (B, N, D),
any row strides (the chunks of adaLN(c).chunk(6, -1) are taken as they are, never copied), unit
stride along D. weight: (D,) or None (RMSNorm has no bias). All float tensors share x's dtype;
float32, float16 and bfloat16 on the kernel backends, float64 too on the reference (and cpp).

Kernel backend primitives (effkernels._triton.rmsnorm, effkernels._ext.rmsnorm); rstd float32:
  rms_modulate_fwd(x, shift, scale, weight, eps, out=None) -> (out, rstd (B, N) f32)
  rms_modulate_bwd(dout, x, shift, scale, weight, rstd) -> (dx, dshift, dscale, dweight)
      dshift/dscale shaped like shift/scale; dweight None when weight is None. Reductions over
      rows go through float32 partial buffers (deterministic).
  rms_fused_fwd(x, y, gate, shift, scale, weight, eps) -> (h, out, rstd)
  rms_fused_bwd(dh, dout, h, y, gate, shift, scale, weight, rstd) -> (dx, dy, dgate, dshift, dscale, dweight)

Forward-mode AD (torch.func.jvp / jacfwd, forward_ad): both ops, on every backend. The kernel
backends run the same kernel forward with the analytic tangent of reference.rmsnorm through
ops._forward_ad.rule.
"""
from __future__ import annotations

import torch

from ..reference import rmsnorm as ref
from . import _forward_ad as fad
from ._common import check_eps, check_same, kernel_module, pick
from .adaln import _check_affine, _check_mod, _check_residual, _check_x, _empty_if_none, _none_if_empty


def _check_rms(x, shift, scale, weight, eps):
    _check_x("x", x)
    _check_mod("shift", shift, x)
    _check_mod("scale", scale, x)
    _check_affine("weight", weight, x)
    check_same(("x", "shift", "scale", "weight"), (x, shift, scale, weight))
    return check_eps(eps)


# ---------------------------------------------------------------------------------------------
# RMSNorm + modulate
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("effkernels::rmsnorm_modulate", mutates_args=())
def _rms_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
            eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel_module("rmsnorm", backend).rms_modulate_fwd(x, shift, scale, weight, eps)


@_rms_op.register_fake
def _(x, shift, scale, weight, eps, backend):
    B, N, _ = x.shape
    return torch.empty_like(x), x.new_empty(B, N, dtype=torch.float32)


@torch.library.custom_op("effkernels::rmsnorm_modulate_backward", mutates_args=())
def _rms_bwd_op(dout: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                weight: torch.Tensor | None, rstd: torch.Tensor, backend: str) -> list[torch.Tensor]:
    dx, dshift, dscale, dw = kernel_module("rmsnorm", backend).rms_modulate_bwd(
        dout.contiguous(), x, shift, scale, weight, rstd)
    return [dx, dshift, dscale, _empty_if_none(dw, x)]


@_rms_bwd_op.register_fake
def _(dout, x, shift, scale, weight, rstd, backend):
    return [torch.empty_like(x), shift.new_empty(shift.shape), scale.new_empty(scale.shape),
            x.new_empty(0) if weight is None else torch.empty_like(weight)]


def _rms_setup(ctx, inputs, output):
    x, shift, scale, weight, _eps, backend = inputs
    ctx.save_for_backward(x, shift, scale, weight, output[1])
    ctx.backend = backend


def _rms_bwd(ctx, dout, _drstd):
    x, shift, scale, weight, rstd = ctx.saved_tensors
    fad.forbid_tangents("rmsnorm_modulate (its backward)", dout, x, shift, scale, weight)
    dx, dshift, dscale, dw = _rms_bwd_op(dout, x, shift, scale, weight, rstd, ctx.backend)
    return dx, dshift, dscale, _none_if_empty(dw), None, None


_rms_op.register_autograd(_rms_bwd, setup_context=_rms_setup)

_rms_rule = fad.rule(
    "rmsnorm_modulate", _rms_op, outputs=1,
    jvp=lambda a, out, d: ref.rmsnorm_modulate_jvp(*a[:3], a[4], a[3], *d[:4]),  # eps before weight
    reference=lambda x, shift, scale, weight, eps, backend: ref.rmsnorm_modulate(x, shift, scale, eps, weight))


def rmsnorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                     weight: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm(x) * (1 + scale) + shift, RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight;
    shift/scale (B, D) broadcast over tokens or (B, N, D) per token."""
    eps = _check_rms(x, shift, scale, weight, eps)
    b = pick("rmsnorm_modulate", x.device, backend)
    if b == "reference":
        return ref.rmsnorm_modulate(x, shift, scale, eps, weight)
    if fad.active():
        return _rms_rule.apply(x, shift, scale, weight, eps, b)[0]
    return _rms_op(x, shift, scale, weight, eps, b)[0]


# ---------------------------------------------------------------------------------------------
# Fused residual add + RMSNorm + modulate
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("effkernels::gated_residual_rmsnorm_modulate", mutates_args=())
def _fused_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              weight: torch.Tensor | None, eps: float,
              backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel_module("rmsnorm", backend).rms_fused_fwd(x, y, gate, shift, scale, weight, eps)


@_fused_op.register_fake
def _(x, y, gate, shift, scale, weight, eps, backend):
    B, N, _ = x.shape
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(B, N, dtype=torch.float32)


@torch.library.custom_op("effkernels::gated_residual_rmsnorm_modulate_backward", mutates_args=())
def _fused_bwd_op(dh: torch.Tensor, dout: torch.Tensor, h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                  shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                  backend: str) -> list[torch.Tensor]:
    dx, dy, dgate, dshift, dscale, dw = kernel_module("rmsnorm", backend).rms_fused_bwd(
        dh.contiguous(), dout.contiguous(), h, y, gate, shift, scale, weight, rstd)
    return [dx, dy, dgate, dshift, dscale, _empty_if_none(dw, h)]


@_fused_bwd_op.register_fake
def _(dh, dout, h, y, gate, shift, scale, weight, rstd, backend):
    return [torch.empty_like(h), torch.empty_like(y), gate.new_empty(gate.shape), shift.new_empty(shift.shape),
            scale.new_empty(scale.shape), h.new_empty(0) if weight is None else torch.empty_like(weight)]


def _fused_setup(ctx, inputs, output):
    _x, y, gate, shift, scale, weight, _eps, backend = inputs
    h, _, rstd = output
    ctx.save_for_backward(h, y, gate, shift, scale, weight, rstd)
    ctx.backend = backend


def _fused_bwd(ctx, dh, dout, _drstd):
    h, y, gate, shift, scale, weight, rstd = ctx.saved_tensors
    fad.forbid_tangents("gated_residual_rmsnorm_modulate (its backward)", dh, dout, h, y, gate, shift, scale,
                        weight)
    dh = torch.zeros_like(h) if dh is None else dh
    dout = torch.zeros_like(h) if dout is None else dout
    dx, dy, dgate, dshift, dscale, dw = _fused_bwd_op(dh, dout, h, y, gate, shift, scale, weight, rstd,
                                                      ctx.backend)
    return dx, dy, dgate, dshift, dscale, _none_if_empty(dw), None, None


_fused_op.register_autograd(_fused_bwd, setup_context=_fused_setup)

_fused_rule = fad.rule(
    "gated_residual_rmsnorm_modulate", _fused_op, outputs=2,
    jvp=lambda a, out, d: ref.gated_residual_rmsnorm_modulate_jvp(*a[:5], a[6], a[5], *d[:6], h=out[0]),
    reference=lambda x, y, gate, shift, scale, weight, eps, backend: ref.gated_residual_rmsnorm_modulate(
        x, y, gate, shift, scale, eps, weight))


def gated_residual_rmsnorm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                    scale: torch.Tensor, eps: float = 1e-6, weight: torch.Tensor | None = None,
                                    *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h) * (1 + scale) + shift) with h = x + gate * y, in one pass over x and y."""
    _check_residual(x, y, gate)
    eps = _check_rms(x, shift, scale, weight, eps)
    b = pick("gated_residual_rmsnorm_modulate", x.device, backend)
    if b == "reference":
        return ref.gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, eps, weight)
    op = _fused_rule.apply if fad.active() else _fused_op
    h, out, _ = op(x, y, gate, shift, scale, weight, eps, b)
    return h, out
