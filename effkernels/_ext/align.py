"""Alignment primitives over effkernels._C (backends "cuda" and "cpp"); contract in effkernels/ops/align.py.

  cosine_fwd(z_hat, z, eps, out=None) -> cos (B, N) float32 (norms clamped below at eps)
  cosine_bwd(dcos, z_hat, z, eps) -> dz_hat in z_hat's dtype; dcos float32 (B, N), may be a
      stride-0 expanded view (read through its strides, not copied).
"""
from __future__ import annotations

import torch

from . import require
from ._util import check_out

require()
_C = torch.ops.effkernels_C


def cosine_fwd(z_hat, z, eps, out=None):
    if out is None:
        return _C.cosine_fwd(z_hat, z, float(eps))
    check_out(out, z_hat.shape[:2], torch.float32, z_hat.device)
    _C.cosine_fwd_out(z_hat, z, float(eps), out)
    return out


def cosine_bwd(dcos, z_hat, z, eps):
    return _C.cosine_bwd(dcos.float(), z_hat, z, float(eps))
