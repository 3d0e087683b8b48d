"""2-D axial RoPE primitives over effkernels._C (backends "cuda" and "cpp"); contract in
effkernels/ops/rope.py.

q, k and the outputs are (B, H, N, Dh) views with any strides and unit stride along Dh (the packed
form's (1, H, T, Dh) views included), pos a (B, N, 2) int32/int64 view, inv_freq (Dh / 2,) float32.
One raw op, effkernels_C::rope2d(q, k, pos, inv_freq, sin_sign, q_out, k_out), writes both outputs;
the backward is the same op with sin_sign = -1 (the inverse rotation).
"""
from __future__ import annotations

import torch

from . import require

require()
_C = torch.ops.effkernels_C

# The raw ops of this family (schema in csrc/bindings.cpp, kernels in csrc/rope.cu).
RAW_OPS = ("rope2d",)


def _outs(q, q_out, k_out):
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if k_out is None else k_out
    return q_out, k_out


def rope2d_fwd(q, k, pos, inv_freq, q_out=None, k_out=None):
    """-> (q_out, k_out), the rotations of q and k (contiguous unless given)."""
    q_out, k_out = _outs(q, q_out, k_out)
    _C.rope2d(q, k, pos, inv_freq, 1.0, q_out, k_out)
    return q_out, k_out


def rope2d_bwd(dq_out, dk_out, pos, inv_freq, dq=None, dk=None):
    """-> (dq, dk), the inverse rotations of the output gradients (contiguous unless given)."""
    dq, dk = _outs(dq_out, dq, dk)
    _C.rope2d(dq_out, dk_out, pos, inv_freq, -1.0, dq, dk)
    return dq, dk
