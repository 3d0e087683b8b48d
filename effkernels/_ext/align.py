"""Alignment primitives over effkernels._C (backends "cuda" and "cpp"); contract in effkernels/ops/align.py.

  cosine_fwd(z_hat, z, eps, out=None) -> cos (B, N) float32 (norms clamped below at eps)
  cosine_bwd(dcos, z_hat, z, eps) -> dz_hat in z_hat's dtype; dcos float32 (B, N), may be a
      stride-0 expanded view (read through its strides, not copied).
  proj_cosine_fwd(h, weight, bias, z, eps, out=None) -> (cos (B, N), norms (B, N, 2)) float32
  proj_cosine_bwd(dcos, h, weight, bias, z, cos, norms, eps, chunk) -> (dh, d weight, d bias or None)
      the projector's last Linear fused in, `chunk` tokens per matmul (CPU tensors only: the GPU
      path of this op is Triton's).
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


def proj_cosine_fwd(h, weight, bias, z, eps, chunk, out=None):
    if out is None:
        return tuple(_C.proj_cosine_fwd(h, weight, bias, z, float(eps), int(chunk)))
    cos, norms = out
    check_out(cos, h.shape[:2], torch.float32, h.device, "out[0] (cos)")
    check_out(norms, (*h.shape[:2], 2), torch.float32, h.device, "out[1] (norms)")
    _C.proj_cosine_fwd_out(h, weight, bias, z, float(eps), int(chunk), cos, norms)
    return cos, norms


def proj_cosine_bwd(dcos, h, weight, bias, z, cos, norms, eps, chunk):
    dh, dw, db = _C.proj_cosine_bwd(dcos.float(), h, weight, bias, z, cos, norms, float(eps), int(chunk))
    return dh, dw, None if bias is None else db
