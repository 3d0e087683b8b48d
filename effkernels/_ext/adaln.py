"""adaLN primitives over effkernels._C (backends "cuda" and "cpp"); contract in effkernels/ops/adaln.py.

Modulation tensors (shift, scale, gate) go to the kernels as they are: (B, D) or (B, N, D) views with
any row strides (the chunks of adaLN(c).chunk(6, -1)), never copied. Statistics are float32 (B, N).
Gradients of broadcast operands come back shaped like them, contiguous.
"""
from __future__ import annotations

import torch

from . import require
from ._util import check_out

require()
_C = torch.ops.effkernels_C


def _none_if_empty(t):
    return None if t.numel() == 0 else t


def ln_modulate_fwd(x, shift, scale, weight, bias, eps, out=None):
    """-> (out, mean (B, N) f32, rstd (B, N) f32)."""
    if out is None:
        return tuple(_C.ln_modulate_fwd(x, shift, scale, weight, bias, float(eps)))
    check_out(out, x.shape, x.dtype, x.device)
    mean, rstd = _C.ln_modulate_fwd_out(x, shift, scale, weight, bias, float(eps), out)
    return out, mean, rstd


def ln_modulate_bwd(dout, x, shift, scale, weight, bias, mean, rstd):
    """-> (dx, dshift, dscale, dweight or None, dbias or None)."""
    dx, dshift, dscale, dw, db = _C.ln_modulate_bwd(dout, x, shift, scale, weight, bias, mean, rstd)
    return dx, dshift, dscale, None if weight is None else dw, None if bias is None else db


def gated_residual_fwd(x, y, gate, out=None):
    """x + gate * y."""
    if out is None:
        return _C.gated_residual_fwd(x, y, gate)
    check_out(out, x.shape, x.dtype, x.device)
    _C.gated_residual_fwd_out(x, y, gate, out)
    return out


def gated_residual_bwd(dout, y, gate):
    """-> (dy, dgate); dx is dout itself."""
    dy, dgate = _C.gated_residual_bwd(dout, y, gate)
    return dy, dgate


def fused_fwd(x, y, gate, shift, scale, weight, bias, eps):
    """-> (h, out, mean, rstd) with h = x + gate * y and out = LN(h) * (1 + scale) + shift."""
    return tuple(_C.fused_fwd(x, y, gate, shift, scale, weight, bias, float(eps)))


def fused_bwd(dh, dout, h, y, gate, shift, scale, weight, bias, mean, rstd):
    """-> (dx, dy, dgate, dshift, dscale, dweight or None, dbias or None)."""
    dx, dy, dgate, dshift, dscale, dw, db = _C.fused_bwd(dh, dout, h, y, gate, shift, scale, weight, bias, mean, rstd)
    return dx, dy, dgate, dshift, dscale, None if weight is None else dw, None if bias is None else db
