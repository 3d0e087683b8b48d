"""SwiGLU primitives over effkernels._C (backends "cuda" and "cpp"); contract in effkernels/ops/swiglu.py.

a and b go to the kernels as they are: (B, N, H) row views with any row strides (the halves of one
projection), unit stride along H, never copied. Results and gradients are contiguous (B, N, H).
"""
from __future__ import annotations

import torch

from . import require
from ._util import check_out

require()
_C = torch.ops.effkernels_C

# The raw ops of this family (schemas in csrc/bindings.cpp, kernels in csrc/swiglu.cu).
RAW_OPS = ("swiglu_fwd", "swiglu_fwd_out", "swiglu_bwd")


def swiglu_fwd(a, b, out=None):
    """silu(a) * b."""
    if out is None:
        return _C.swiglu_fwd(a, b)
    check_out(out, a.shape, a.dtype, a.device)
    _C.swiglu_fwd_out(a, b, out)
    return out


def swiglu_bwd(dout, a, b):
    """-> (da, db)."""
    da, db = _C.swiglu_bwd(dout, a, b)
    return da, db
