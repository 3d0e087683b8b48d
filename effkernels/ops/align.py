"""Public alignment losses (REPA / ERW / SRA) with validation, dispatch and autograd.

z_hat (B, N, D) the projection, z (B, N, D) the target (no gradient ever flows into z). Float dtypes
may differ (a bf16 projection against an fp32 encoder target is normal); the math is float32.

Kernel backend primitives (effkernels._triton.align, effkernels._ext.align):
  cosine_fwd(z_hat, z, eps, out=None) -> cos (B, N) float32, one pass: norms and dot product fused;
      norms clamped at reference.align.norm_clamp(eps, z_hat.dtype) (the primitives apply it)
  cosine_bwd(dcos, z_hat, z, eps) -> dz_hat (z_hat's dtype); dcos (B, N) float32, may be an
      expanded (stride 0) view; norms recomputed, one pass.

Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad): every loss here, on every
backend, with tangents through z_hat (and h, weight, bias) only: z is detached. per_token_cosine
and projected_cosine keep their kernel forward with the analytic tangent of reference.jvp
(float32; projected_cosine's tangent also chunk_tokens at a time) through ops._forward_ad.rule;
the cosine loss is built on per_token_cosine; the smooth-L1 and MSE losses are plain torch.
"""
from __future__ import annotations

import torch

from ..reference import align as ref
from ..reference import jvp as ref_jvp
from . import _forward_ad as fad
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
    fad.forbid_tangents("per_token_cosine (its backward)", dcos, z_hat)
    return _cos_bwd_op(dcos, z_hat, z, ctx.eps, ctx.backend), None, None, None


_cos_op.register_autograd(_cos_bwd, setup_context=_cos_setup)

_cos_rule = fad.rule("per_token_cosine", _cos_op,
                     jvp=lambda a, out, d: ref_jvp.per_token_cosine_jvp(a[0], a[1], a[2], d[0]),
                     reference=lambda z_hat, z, eps, backend: ref.per_token_cosine(z_hat, z, eps))


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
    return (_cos_rule.apply if fad.active() else _cos_op)(z_hat, z, eps, b)


def _check_weight(token_weight, like: torch.Tensor) -> None:
    """token_weight: None, or a floating (B, N) tensor on like's device (like: (B, N, ...))."""
    if token_weight is None or not isinstance(like, torch.Tensor):  # like's own check names it
        return
    check_tensor("token_weight", token_weight, dims=(2,), floating=True)
    if tuple(token_weight.shape) != tuple(like.shape[:2]):
        raise ValueError(f"token_weight must be (B, N) = {tuple(like.shape[:2])}, got {tuple(token_weight.shape)}")
    check_same(("z_hat", "token_weight"), (like, token_weight), dtype=False)


# Each loss reduces its per-token values by their mean, or with token_weight (B, N) by
# sum(token_weight * value): packed rows of per-sample budgets, each weighted 1 / (B * its
# sample's count) (TokenPack.token_weights), weigh every sample as a fixed count would.

def cosine_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, eps: float = 1e-8, *,
                          backend: str | None = None, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """REPA's loss: -mean over batch and tokens of the per-token cosine similarity (float32 scalar)."""
    _check_weight(token_weight, z_hat)
    return -ref.reduce_tokens(per_token_cosine(z_hat, z, eps, backend=backend), token_weight)


def smooth_l1_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, beta: float = 0.05, *,
                             token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """SRA's original distance: smooth-L1 (transition at beta), the mean over ALL elements (batch,
    tokens and D), i.e. F.smooth_l1_loss(z_hat, z, beta=beta) with its default mean, as SRA's
    release reduces it; with token_weight, the weighted sum over tokens of each token's mean over D.
    Float32 scalar; z gets no gradient."""
    _check(z_hat, z)
    _check_weight(token_weight, z_hat)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    return ref.smooth_l1_alignment_loss(z_hat, z, beta, token_weight)


def mse_alignment_loss(z_hat: torch.Tensor, z: torch.Tensor, *,
                       token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error, the mean over ALL elements (batch, tokens and D), i.e. F.mse_loss(z_hat, z);
    with token_weight, the weighted sum over tokens of each token's mean over D. Float32 scalar; z
    gets no gradient."""
    _check(z_hat, z)
    _check_weight(token_weight, z_hat)
    return ref.mse_alignment_loss(z_hat, z, token_weight)


# ---------------------------------------------------------------------------------------------
# The projector's last Linear fused into the cosine loss
#
# Kernel backend primitives (effkernels._triton.align_proj, effkernels._ext.align; cpp and triton):
#   proj_cosine_fwd(h, weight, bias, z, eps, chunk) -> (cos (B, N), norms (B, N, 2) = (|y|, |z|)) float32
#   proj_cosine_bwd(dcos, h, weight, bias, z, cos, norms, eps, chunk) -> (dh contiguous in h's dtype,
#       d weight (contiguous), d bias or None); dcos (B, N) float32, any strides.
# y = h W^T + bias exists only `chunk` tokens at a time (the backward's dy likewise).
# ---------------------------------------------------------------------------------------------

# Tokens per chunk: the chunk's y (or dy) holds about this many elements (4 MiB in float32).
CHUNK_ELEMENTS = 1 << 20


def default_chunk(z_dim: int) -> int:
    """Tokens per chunk for a projection of width z_dim: CHUNK_ELEMENTS / z_dim, a multiple of 64."""
    return max(64, CHUNK_ELEMENTS // max(z_dim, 1) // 64 * 64)


def _check_proj(h, weight, bias, z, chunk_tokens):
    check_tensor("h", h, dims=(3,), floating=True)
    check_tensor("weight", weight, dims=(2,), floating=True)
    if bias is not None:
        check_tensor("bias", bias, dims=(1,), floating=True)
    check_tensor("z", z, dims=(3,), floating=True)
    if weight.shape[1] != h.shape[2] or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be (Z, K) with K = h's last dim {h.shape[2]} and Z, K >= 1, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (Z,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(z.shape) != (h.shape[0], h.shape[1], weight.shape[0]):
        raise ValueError(f"z must be (B, N, Z) = {(h.shape[0], h.shape[1], weight.shape[0])}, got {tuple(z.shape)}")
    check_same(("h", "weight", "bias", "z"), (h, weight, bias, z), dtype=False)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != h.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but h has {h.dtype} (outside autocast they must match)")
    for name, t in (("h", h), ("weight", weight), ("bias", bias), ("z", z)):
        if t is not None:
            check_last_dim_contiguous(name, t)
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


@torch.library.custom_op("effkernels::projected_cosine", mutates_args=())
def _pcos_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor, eps: float,
             chunk: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(kernel_module("align", backend).proj_cosine_fwd(h, weight, bias, z, eps, chunk))


@_pcos_op.register_fake
def _(h, weight, bias, z, eps, chunk, backend):
    return (h.new_empty(h.shape[:2], dtype=torch.float32), h.new_empty((*h.shape[:2], 2), dtype=torch.float32))


@torch.library.custom_op("effkernels::projected_cosine_backward", mutates_args=())
def _pcos_bwd_op(dcos: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor, cos: torch.Tensor, norms: torch.Tensor, eps: float, chunk: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dw, db = kernel_module("align", backend).proj_cosine_bwd(dcos.float(), h, weight, bias, z, cos, norms,
                                                                 eps, chunk)
    # A custom op returns tensors only: "no bias" is an empty d bias, dropped by the autograd below.
    return dh, dw, db if db is not None else h.new_empty(0, dtype=torch.float32)


@_pcos_bwd_op.register_fake
def _(dcos, h, weight, bias, z, cos, norms, eps, chunk, backend):
    db = bias.new_empty(bias.shape) if bias is not None else h.new_empty(0, dtype=torch.float32)
    return h.new_empty(h.shape), weight.new_empty(weight.shape), db


def _pcos_setup(ctx, inputs, output):
    h, weight, bias, z, eps, chunk, backend = inputs
    cos, norms = output
    ctx.save_for_backward(h, weight, bias, z, cos, norms)
    ctx.mark_non_differentiable(norms)
    ctx.eps, ctx.chunk, ctx.backend, ctx.has_bias = eps, chunk, backend, bias is not None


def _pcos_bwd(ctx, dcos, _dnorms):
    h, weight, bias, z, cos, norms = ctx.saved_tensors
    fad.forbid_tangents("projected_cosine (its backward)", dcos, h, weight, bias)
    dh, dw, db = _pcos_bwd_op(dcos, h, weight, bias, z, cos, norms, ctx.eps, ctx.chunk, ctx.backend)
    return dh, dw, db if ctx.has_bias else None, None, None, None, None


_pcos_op.register_autograd(_pcos_bwd, setup_context=_pcos_setup)

_pcos_rule = fad.rule(
    "projected_cosine", _pcos_op, outputs=1,
    jvp=lambda a, out, d: ref_jvp.projected_cosine_jvp(*a[:5], *d[:3], chunk=a[5]),
    reference=lambda h, weight, bias, z, eps, chunk, backend: ref.projected_cosine(h, weight, bias, z, eps))


def projected_cosine(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor,
                     eps: float = 1e-8, *, chunk_tokens: int | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """cos(h[b, n] W^T + bias, z[b, n]) in float32 -> (B, N), the projection never materialised whole.

    h (B, N, K): the projector's last hidden state; weight (Z, K), bias (Z,) or None: its last Linear;
    z (B, N, Z): the target, never differentiated. Norms are clamped at norm_clamp(eps, h.dtype).
    Under autocast h, weight and bias are cast to the autocast dtype first, as F.linear would cast
    them, and the op itself runs with autocast off (its math is float32). chunk_tokens: tokens per
    chunk (default default_chunk(Z)); gradients reach h, weight and bias.
    """
    _check_proj(h, weight, bias, z, chunk_tokens)
    eps = check_eps(eps)
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    b = pick("projected_cosine", h.device, backend)
    z = z.detach()
    chunk = chunk_tokens or default_chunk(weight.shape[0])
    with torch.autocast(dev, enabled=False):
        if b == "reference":
            return ref.projected_cosine(h, weight, bias, z, eps)
        return (_pcos_rule.apply if fad.active() else _pcos_op)(h, weight, bias, z, eps, chunk, b)[0]


def projected_cosine_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor,
                          eps: float = 1e-8, *, chunk_tokens: int | None = None,
                          backend: str | None = None, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """REPA's loss with the projector's last Linear fused in: -mean over batch and tokens of
    projected_cosine (float32 scalar); equals cosine_alignment_loss(F.linear(h, weight, bias), z)
    up to the projection's rounding (here never rounded to h's dtype). token_weight: as there."""
    _check_weight(token_weight, h)
    cos = projected_cosine(h, weight, bias, z, eps, chunk_tokens=chunk_tokens, backend=backend)
    return -ref.reduce_tokens(cos, token_weight)
