"""Public attention over visible tokens: the dense fixed-K form and the packed varlen form.

Dense (TREAD and MaskDiT as published, every sample keeps K tokens, gathered once per route):
  visible_attention(q, k, v) with q, k, v (B, H, K, Dh) -> scaled_dot_product_attention on every
  backend (PyTorch's own fused kernels; reference.attention.dense_attention is its spec in tests).
Packed (a different count per sample): q, k, v (T, H, Dh), cu_seqlens (S + 1,) int32 offsets and
max_seqlen an int (flash-attn's convention; no .item() inside the op). Paths: flash-attn's
flash_attn_varlen_func for fp16/bf16 CUDA tensors when flash_attn imports, else the reference (one
SDPA per segment) registered as an op with the softmax backward written out, so torch.compile
traces it without a graph break.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ..reference import attention as ref
from ._common import check_same, check_tensor

lengths_to_cu_seqlens = ref.lengths_to_cu_seqlens


@torch.library.custom_op("effkernels::varlen_attention", mutates_args=())
def _varlen_ref_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   max_seqlen: int, scale: float) -> torch.Tensor:
    return ref.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)


@_varlen_ref_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q)


@torch.library.custom_op("effkernels::varlen_attention_backward", mutates_args=())
def _varlen_ref_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_seqlens: torch.Tensor, max_seqlen: int, scale: float) -> list[torch.Tensor]:
    return list(ref.varlen_attention_backward(dout, q, k, v, cu_seqlens, scale))


@_varlen_ref_bwd_op.register_fake
def _(dout, q, k, v, cu_seqlens, max_seqlen, scale):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _varlen_bwd(ctx, dout):
    q, k, v, cu = ctx.saved_tensors
    dq, dk, dv = _varlen_ref_bwd_op(dout, q, k, v, cu, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_ref_op.register_autograd(_varlen_bwd, setup_context=_varlen_setup)


def _check_qkv(q, k, v, dims):
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(n, t, dims=(dims,), floating=True)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_same(("q", "k", "v"), (q, k, v))


def visible_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                      scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention within each sample's visible tokens: dense (B, H, K, Dh) or packed (T, H, Dh)."""
    if cu_seqlens is None:
        _check_qkv(q, k, v, 4)
        backends.requested_backend(backend)  # validates the name; every backend runs PyTorch's SDPA here
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    _check_qkv(q, k, v, 3)
    check_tensor("cu_seqlens", cu_seqlens, dims=(1,), integer=True)
    check_same(("q", "cu_seqlens"), (q, cu_seqlens), dtype=False)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets (S + 1,), got shape {tuple(cu_seqlens.shape)}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int (the longest segment), got {max_seqlen!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = backends.requested_backend(backend)
    use_fa = (name in ("auto", "cuda") and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
              and backends.flash_attn_status()[0])
    if use_fa:
        from flash_attn import flash_attn_varlen_func
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)
    return _varlen_ref_op(q, k, v, cu_seqlens, max_seqlen, scale)
