"""Public attention over visible tokens: the dense fixed-K form and the packed varlen form.

Dense (TREAD and MaskDiT as published, every sample keeps K tokens, gathered once per route):
  visible_attention(q, k, v) with q, k, v (B, H, K, Dh) -> scaled_dot_product_attention on every
  backend (PyTorch's own fused kernels; reference.attention.dense_attention is its spec in tests).
Packed (a different count per sample): q, k, v (T, H, Dh), cu_seqlens (S + 1,) int32 offsets and
max_seqlen an int (flash-attn's convention; no .item() inside the op). Paths, by backend:
  auto       CUDA tensors: flash-attn's flash_attn_varlen_func for fp16/bf16 when flash_attn
             imports, else the Triton varlen kernel (fp32/fp16/bf16; effkernels._triton.attention),
             else the reference; CPU tensors: the reference.
  triton     the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
  cuda       flash-attn; an error where it cannot run (fp32, or flash_attn absent): the extension
             has no attention kernel, and a silent switch to another backend is what this avoids.
  reference  (and cpp, whose CPU path it is) one SDPA per segment.
The Triton kernel and the reference are registered ops with their backward written out (the
Triton one saves the log-sum-exp), so torch.compile traces either without a graph break.

Forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad): the dense form runs SDPA's
math backend while a forward-AD level is open (PyTorch's fused CPU/CUDA kernels have no forward
derivative); the packed form's Triton and reference paths keep their forward with the analytic
tangent of reference.jvp, one segment at a time, through ops._forward_ad.rule. flash-attn's varlen
function has none: `auto` takes the Triton path (else the reference) instead while forward AD is
open, and an explicit `cuda` raises ForwardADUnsupported (a NotImplementedError) naming the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import backends
from ..reference import attention as ref
from ..reference import jvp as ref_jvp
from . import _forward_ad as fad
from ._common import check_same, check_tensor, data_checks_enabled, kernel_module, pick

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
    fad.forbid_tangents("visible_attention (its backward)", dout, q, k, v)
    dq, dk, dv = _varlen_ref_bwd_op(dout, q, k, v, cu, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_ref_op.register_autograd(_varlen_bwd, setup_context=_varlen_setup)


# The Triton kernel: forward returns (out, lse (H, T) float32); backward reads both.
@torch.library.custom_op("effkernels::varlen_attention_triton", mutates_args=())
def _varlen_tri_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel_module("attention", "triton").varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale)


@_varlen_tri_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("effkernels::varlen_attention_triton_backward", mutates_args=())
def _varlen_tri_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                       scale: float) -> list[torch.Tensor]:
    if dout.shape[-1] > 1 and dout.stride(-1) != 1:  # the kernel takes any row/head strides, not this
        dout = dout.contiguous()
    return list(kernel_module("attention", "triton").varlen_bwd(dout, q, k, v, out, lse, cu_seqlens,
                                                                 max_seqlen, scale))


@_varlen_tri_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]


def _varlen_tri_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _varlen_tri_bwd(ctx, dout, _dlse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    fad.forbid_tangents("visible_attention (its backward)", dout, q, k, v)
    dq, dk, dv = _varlen_tri_bwd_op(dout, q, k, v, out, lse, cu, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_tri_op.register_autograd(_varlen_tri_bwd, setup_context=_varlen_tri_setup)


def _varlen_jvp(a, out, d):
    q, k, v, cu, _, scale = a
    return ref_jvp.varlen_attention_jvp(q, k, v, cu, *d[:3], scale=scale)


def _varlen_plain(q, k, v, cu_seqlens, max_seqlen, scale):
    return ref_jvp.varlen_attention(q, k, v, cu_seqlens, scale)


_varlen_ref_rule = fad.rule("visible_attention", _varlen_ref_op, jvp=_varlen_jvp, reference=_varlen_plain)
_varlen_tri_rule = fad.rule("visible_attention", _varlen_tri_op, outputs=1, jvp=_varlen_jvp,
                            reference=_varlen_plain)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_HEAD_DIM = 128  # effkernels._triton.attention._MAX_HEAD_DIM (not imported: triton is optional)


def _packed_path(requested: str, q: torch.Tensor, forward_ad: bool = False) -> str:
    """Which implementation runs the packed form: "flash_attn", "triton" or "reference".

    requested: backends.requested_backend(...), already checked runnable on q's device by pick().
    forward_ad: a forward-AD level is open; flash-attn has no JVP, so auto skips it and cuda raises.
    Raises where the request cannot be honoured for these tensors (no silent fallback)."""
    fa_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and backends.flash_attn_status()[0]
    if forward_ad and requested == "cuda":
        raise fad.ForwardADUnsupported(
            "effkernels.ops.visible_attention: backend 'cuda' (flash-attn's varlen kernel) has no forward-mode AD "
            "(JVP) rule; under torch.func.jvp / jacfwd / forward_ad use backend='triton' or 'reference' "
            "(or 'auto', which takes them)")
    fa_ok = fa_ok and not forward_ad
    tri_fits = q.dtype in _TRITON_DTYPES and q.shape[-1] <= _TRITON_MAX_HEAD_DIM
    if requested == "triton":
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"q: the triton backend's packed attention takes float32, float16 or bfloat16, got {q.dtype}")
        if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
            raise ValueError(f"q: the triton backend's packed attention takes head dims up to "
                             f"{_TRITON_MAX_HEAD_DIM}, got Dh={q.shape[-1]}")
        return "triton"
    if requested == "cuda":
        if not fa_ok:
            raise RuntimeError(
                f"backend 'cuda' cannot run visible_attention's packed form on {q.dtype} {q.device.type} tensors "
                f"here: it is flash-attn's varlen kernel, which needs fp16/bf16 CUDA tensors and flash_attn "
                f"({backends.flash_attn_status()[1]}); use backend='triton' or 'auto'")
        return "flash_attn"
    if requested == "auto" and q.is_cuda:
        if fa_ok:
            return "flash_attn"
        if tri_fits and backends.available("triton", q.device)[0]:
            return "triton"
    return "reference"


def _check_qkv(q, k, v, dims):
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(n, t, dims=(dims,), floating=True)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_same(("q", "k", "v"), (q, k, v))


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Offsets start at 0, never decrease, end at the packed row count; max_seqlen covers the longest
    segment. Data-dependent (one host sync), so eager only; EFFKERNELS_CHECK_INDICES=0 skips it.
    Unchecked, rows past cu_seqlens[-1] would silently stay zero and flash-attn would read past a
    segment shorter than max_seqlen claims."""
    if torch.compiler.is_compiling() or not data_checks_enabled():
        return
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    first, last, low, high = torch.stack([cu_seqlens[0], cu_seqlens[-1], steps.min(), steps.max()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if low < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    if last != total:
        raise ValueError(f"cu_seqlens must end at the number of packed rows T={total}, got {last}")
    if max_seqlen < high:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest segment in cu_seqlens ({high})")


def visible_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                      scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention within each sample's visible tokens: dense (B, H, K, Dh) or packed (T, H, Dh).

    backend: as for every op; an explicit backend that cannot run on q's device is an error (the
    dense form runs PyTorch's SDPA on every backend that can run; the packed form's paths per
    backend are in the module docstring). Packed: cu_seqlens (S + 1,) int32/int64 offsets from 0 to T, non-decreasing,
    and max_seqlen >= the longest segment (values checked once, in eager mode).
    """
    dims = 4 if cu_seqlens is None else 3
    _check_qkv(q, k, v, dims)
    pick("visible_attention", q.device, backend)  # raises for an explicit backend that cannot run here
    if cu_seqlens is None:
        if fad.active():  # the fused SDPA kernels have no forward derivative; the math backend does
            with sdpa_kernel([SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    check_tensor("cu_seqlens", cu_seqlens, dims=(1,), integer=True)
    check_same(("q", "cu_seqlens"), (q, cu_seqlens), dtype=False)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets (S + 1,), got shape {tuple(cu_seqlens.shape)}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int (the longest segment), got {max_seqlen!r}")
    _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    forward_ad = fad.active()
    path = _packed_path(backends.requested_backend(backend), q, forward_ad)
    if path == "flash_attn":
        from flash_attn import flash_attn_varlen_func
        cu = cu_seqlens.to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale)
    if path == "triton":
        q, k, v = (t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return (_varlen_tri_rule.apply if forward_ad else _varlen_tri_op)(q, k, v, cu_seqlens, max_seqlen, scale)[0]
    return (_varlen_ref_rule.apply if forward_ad else _varlen_ref_op)(q, k, v, cu_seqlens, max_seqlen, scale)
