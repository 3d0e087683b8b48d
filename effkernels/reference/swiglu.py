"""Reference SwiGLU: silu(a) * b, the elementwise half of a SwiGLU MLP. The specification, and its
analytic tangent (JVP).

a, b: one shape (..., H), one dtype; in a SwiGLU MLP they are the two halves of one (..., 2H)
projection (`a, b = fc1(x).chunk(2, -1)`: strided views, row stride 2H). The product is computed in
float32 (float64 stays float64) and cast back to a's dtype once, at the end.
"""
from __future__ import annotations

import torch

from ._common import _up


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b = a * sigmoid(a) * b."""
    af = _up(a)
    return (af * torch.sigmoid(af) * _up(b)).to(a.dtype)


def silu_grad(af: torch.Tensor) -> torch.Tensor:
    """d silu(a) / da = s * (1 + a * (1 - s)) with s = sigmoid(a), in af's dtype."""
    s = torch.sigmoid(af)
    return s * (1 + af * (1 - s))


def swiglu_jvp(a: torch.Tensor, b: torch.Tensor, da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """d[silu(a) * b] = silu'(a) * da * b + silu(a) * db, in float32 (float64 kept), in a's dtype."""
    af, bf = _up(a), _up(b)
    return (silu_grad(af) * _up(da) * bf + af * torch.sigmoid(af) * _up(db)).to(a.dtype)
