"""RMSNorm primitives over effkernels._C (backends "cuda" and "cpp"); contract in effkernels/ops/rmsnorm.py.

Modulation tensors (shift, scale, gate) go to the kernels as they are: (B, D) or (B, N, D) views with
any row strides (the chunks of adaLN(c).chunk(6, -1)), never copied. rstd is float32 (B, N).
Gradients of broadcast operands come back shaped like them, contiguous. The C++ CPU path
accumulates in float32 for every input dtype, float64 included.
"""
from __future__ import annotations

import torch

from . import require
from ._util import check_out

require()
_C = torch.ops.effkernels_C


def rms_modulate_fwd(x, shift, scale, weight, eps, out=None):
    """-> (out, rstd (B, N) f32)."""
    if out is None:
        return tuple(_C.rms_modulate_fwd(x, shift, scale, weight, float(eps)))
    check_out(out, x.shape, x.dtype, x.device)
    rstd = _C.rms_modulate_fwd_out(x, shift, scale, weight, float(eps), out)
    return out, rstd


def rms_modulate_bwd(dout, x, shift, scale, weight, rstd):
    """-> (dx, dshift, dscale, dweight or None)."""
    dx, dshift, dscale, dw = _C.rms_modulate_bwd(dout, x, shift, scale, weight, rstd)
    return dx, dshift, dscale, None if weight is None else dw


def rms_fused_fwd(x, y, gate, shift, scale, weight, eps):
    """-> (h, out, rstd) with h = x + gate * y and out = RMSNorm(h) * (1 + scale) + shift."""
    return tuple(_C.rms_fused_fwd(x, y, gate, shift, scale, weight, float(eps)))


def rms_fused_bwd(dh, dout, h, y, gate, shift, scale, weight, rstd):
    """-> (dx, dy, dgate, dshift, dscale, dweight or None)."""
    dx, dy, dgate, dshift, dscale, dw = _C.rms_fused_bwd(dh, dout, h, y, gate, shift, scale, weight, rstd)
    return dx, dy, dgate, dshift, dscale, None if weight is None else dw
