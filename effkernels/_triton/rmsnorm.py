"""Triton primitives of the RMSNorm family: RMSNorm + modulate and the fused gated residual + RMSNorm
+ modulate, forward and backward.

Primitive contract: see effkernels/ops/rmsnorm.py. The kernels are the adaLN family's LayerNorm
kernels with the constexpr RMS (effkernels/_triton/adaln.py, which also lists their AOT variants):
the same grid, tiling, modulation, partial sums and casts, with mean 0, no bias and no sum(g) term.

The forward primitives take out= (fused_fwd: h_out= and out=) so that tests can hand in
NaN-poisoned buffers, which may be strided row views.
"""
from __future__ import annotations

from .adaln import _ln_bwd, _ln_fwd


def rms_modulate_fwd(x, shift, scale, weight, eps, out=None):
    """(RMSNorm(x) * (1 + scale) + shift, rstd (B, N) f32)."""
    _, out, _, rstd = _ln_fwd(x, None, None, shift, scale, weight, None, eps, None, out, rms=True)
    return out, rstd


def rms_modulate_bwd(dout, x, shift, scale, weight, rstd):
    """(dx, dshift, dscale, dweight); dweight None when weight is None."""
    dx, _, _, dshift, dscale, dweight, _ = _ln_bwd(None, dout, x, None, None, shift, scale, weight, None, None, rstd,
                                                   rms=True)
    return dx, dshift, dscale, dweight


def rms_fused_fwd(x, y, gate, shift, scale, weight, eps, *, h_out=None, out=None):
    """(h = x + gate * y, RMSNorm(h) * (1 + scale) + shift, rstd), one pass over x and y."""
    h, out, _, rstd = _ln_fwd(x, y, gate, shift, scale, weight, None, eps, h_out, out, rms=True)
    return h, out, rstd


def rms_fused_bwd(dh, dout, h, y, gate, shift, scale, weight, rstd):
    """(dx, dy, dgate, dshift, dscale, dweight) of rms_fused_fwd given d(h) and d(out)."""
    return _ln_bwd(dh, dout, h, y, gate, shift, scale, weight, None, None, rstd, rms=True)[:6]


def aot_specs():
    """None of its own: the kernels and their variants are adaln.py's."""
    return []
