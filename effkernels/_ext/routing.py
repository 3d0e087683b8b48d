"""Routing primitives over effkernels._C (backends "cuda" and "cpp"); contract in effkernels/ops/routing.py.

  gather(x, idx, out=None) -> (B, K, D)
  scatter(x, x_sub, idx, num_tokens, out=None) -> (B, N, D); x None means zeros, x_sub None zero rows.

Validation (shapes, dtypes, index range, duplicates) happens in effkernels.ops before these run.
"""
from __future__ import annotations

import torch

from . import require
from ._util import check_out

require()
_C = torch.ops.effkernels_C


def gather(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x_sub[b, k] = x[b, idx[b, k]]."""
    if out is None:
        return _C.gather(x, idx)
    check_out(out, (x.shape[0], idx.shape[1], x.shape[2]), x.dtype, x.device)
    _C.gather_out(x, idx, out)
    return out


def scatter(x: torch.Tensor | None, x_sub: torch.Tensor | None, idx: torch.Tensor, num_tokens: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x (or zeros) with rows idx[b, k] replaced by x_sub[b, k] (or zeros), out of place."""
    if out is None:
        return _C.scatter(x, x_sub, idx, int(num_tokens))
    like = x if x is not None else x_sub
    check_out(out, (idx.shape[0], num_tokens, like.shape[2]), like.dtype, like.device)
    _C.scatter_out(x, x_sub, idx, out)
    return out
