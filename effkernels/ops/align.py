"""Public alignment losses (REPA / ERW / SRA) with validation, dispatch and autograd.

z_hat (B, N, D) the projection, z (B, N, D) the target (no gradient ever flows into z). Float dtypes
may differ (a bf16 projection against an fp32 encoder target is normal); the math is float32.

Kernel backend primitives (effkernels._triton.align, effkernels._ext.align):
  cosine_fwd(z_hat, z, eps, out=None) -> cos (B, N) float32, one pass: norms and dot product fused;
      norms clamped at reference.align.norm_clamp(eps, z_hat.dtype) (the primitives apply it)
  cosine_bwd(dcos, z_hat, z, eps) -> dz_hat (z_hat's dtype); dcos (B, N) float32, may be an
      expanded (stride 0) view; norms recomputed, one pass.
"""
from __future__ import annotations

import torch

from ..reference import align as ref
from ._common import check_eps, check_last_dim_contiguous, check_same, check_tensor, kernel_module, pick


def _check(z_hat, z):
    check_tensor("z_hat", z_hat, dims=(3,), floating=True)
    check_tensor("z", z, dims=(3,), floating=True)
    if z.shape != z_hat.shape:
        raise ValueError(f"z must have z_hat's shape {tuple(z_hat.shape)} (B, N, D), got {tuple(z.shape)}")
    check_same(("z_hat", "z"), (z_hat, z), dtype=False)
    check_last_dim_contiguous("z_hat", z_hat)
    check_last_dim_contiguous("z", z)


@torch.library.custom_op("effkernels::per_token_cosine", mutates_args=())
def _cos_op(z_hat: torch.Tensor, z: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return kernel_module("align", backend).cosine_fwd(z_hat, z, eps)


@_cos_op.register_fake
def _(z_hat, z, eps, backend):
    return z_hat.new_empty(z_hat.shape[:2], dtype=torch.float32)


@torch.library.custom_op("effkernels::per_token_cosine_backward", mutates_args=())
def _cos_bwd_op(dcos: torch.Tensor, z_hat: torch.Tensor, z: torch.Tensor, eps: float,
                backend: str) -> torch.Tensor:
    return kernel_module("align", backend).cosine_bwd(dcos.float(), z_hat, z, eps)


@_cos_bwd_op.register_fake
def _(dcos, z_hat, z, eps, backend):
    return torch.empty_like(z_hat)


def _cos_setup(ctx, inputs, output):
    z_hat, z, eps, backend = inputs
    ctx.save_for_backward(z_hat, z)
    ctx.eps, ctx.backend = eps, backend


def _cos_bwd(ctx, dcos):
    z_hat, z = ctx.saved_tensors
    return _cos_bwd_op(dcos, z_hat, z, ctx.eps, ctx.backend), None, None, None


_cos_op.register_autograd(_cos_bwd, setup_context=_cos_setup)


def per_token_cosine(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8, *,
                     backend: str | None = None) -> torch.Tensor:
    """cos(z_hat[b, n], z[b, n]) over D in float32: -> (B, N) float32.

    Norms are clamped below at max(eps, finfo(z_hat.dtype).tiny) (reference.align.norm_clamp): eps
    itself for float32/bfloat16, 2**-14 for float16, so that a zero fp16 row's gradient is finite.
    """
    _check(z_hat, z)
    eps = check_eps(eps)
    b = pick("per_token_cosine", z_hat.device, backend)
    z = z.detach()
    if b == "reference":
        return ref.per_token_cosine(z_hat, z, eps)
    return _cos_op(z_hat, z, eps, b)


def cosine_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8, *,
                          backend: str | None = None) -> torch.Tensor:
    """REPA's loss: -mean over batch and tokens of the per-token cosine similarity (float32 scalar)."""
    return -per_token_cosine(z_hat, z, eps, backend=backend).mean()


def smooth_l1_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, beta: float = 0.05) -> torch.Tensor:
    """SRA's original distance: smooth-L1 summed over D, mean over tokens (PyTorch's fused op)."""
    _check(z_hat, z)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    return ref.smooth_l1_alignment_loss(z_hat, z, beta)


def mse_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Squared error summed over D, mean over tokens (PyTorch's fused op)."""
    _check(z_hat, z)
    return ref.mse_alignment_loss(z_hat, z)
