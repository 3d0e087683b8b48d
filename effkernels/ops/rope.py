"""Public 2-D axial rotary embedding op: rope2d(q, k, pos) -> (rope(q), rope(k)) in one pass.

Forms (frequencies and pair layout: effkernels/reference/rope.py, LightningDiT's for Dh % 4 == 0):
  dense   q, k (B, H, N, Dh), SDPA's layout, e.g. the permuted views of one qkv projection; pos
          (B, N, 2) per sample (routed / masked tokens carry their own positions, gathered with the
          tokens' index) or (N, 2) shared by every sample;
  packed  q, k (T, H, Dh), flash-attn's varlen layout; pos (T, 2), one row per packed token.
q and k share one shape, dtype (float32/16, bfloat16, float64) and device, any strides with unit
stride along Dh (never copied); Dh even. pos: int32 or int64 (row, column), any strides. theta: the
frequency base (10000, as LightningDiT). The results are contiguous, shaped like q, in q's dtype;
angles and products in float32 (float64 kept by the reference backend).

Kernel backend primitives (effkernels._triton.rope, effkernels._ext.rope), on the dense form
(the packed one is the view (1, H, T, Dh)):
  rope2d_fwd(q, k, pos, inv_freq, q_out=None, k_out=None) -> (q_out, k_out)
  rope2d_bwd(dq_out, dk_out, pos, inv_freq, dq=None, dk=None) -> (dq, dk)
      q, k (B, H, N, Dh) views; pos (B, N, 2) view (stride 0 over B for a shared one); inv_freq the
      (Dh / 2,) float32 reference.rope.rope2d_inv_freq; outputs (B, H, N, Dh) views, written.

Forward-mode AD: on every backend; the map is linear in q and k, so the tangent is the same
rotation of the tangents (reference.rope.rope2d_jvp) through ops._forward_ad.rule.
"""
from __future__ import annotations

import math

import torch

from ..reference import rope as ref
from . import _forward_ad as fad
from ._common import check_last_dim_contiguous, check_same, check_tensor, kernel_module, pick

_INV_FREQ: dict = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The (Dh / 2,) float32 inverse frequencies, made once per (Dh, theta, device)."""
    key = (head_dim, theta, str(device))
    if key not in _INV_FREQ:
        _INV_FREQ[key] = ref.rope2d_inv_freq(head_dim, theta, torch.float32, device)
    return _INV_FREQ[key]


def _check(q, k, pos, theta) -> float:
    check_tensor("q", q, dims=(3, 4), floating=True)
    check_tensor("k", k, floating=True)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("k", k)
    if q.shape[-1] % 2 or q.shape[-1] < 2:
        raise ValueError(f"q and k must have an even head dim Dh >= 2, got Dh={q.shape[-1]}")
    check_tensor("pos", pos, integer=True)
    check_same(("q", "k"), (q, k))
    check_same(("q", "pos"), (q, pos), dtype=False)
    if q.dim() == 4:
        B, _, N, _ = q.shape
        if tuple(pos.shape) not in ((B, N, 2), (N, 2)):
            raise ValueError(f"pos must have shape (B, N, 2)={(B, N, 2)} or (N, 2)={(N, 2)} for dense (B, H, N, Dh) "
                             f"q, got {tuple(pos.shape)}")
    elif tuple(pos.shape) != (q.shape[0], 2):
        raise ValueError(f"pos must have shape (T, 2)={(q.shape[0], 2)} for packed (T, H, Dh) q, got "
                         f"{tuple(pos.shape)}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"theta must be a finite positive number, got {theta!r}")
    return float(theta)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """The kernels' (B, H, N, Dh) view of a dense or packed (T, H, Dh) tensor."""
    return t if t.dim() == 4 else t.transpose(0, 1).unsqueeze(0)


def _dense_pos(pos: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if q.dim() == 3:
        return pos.unsqueeze(0)                      # (1, T, 2)
    return pos if pos.dim() == 3 else pos.unsqueeze(0).expand(q.shape[0], -1, -1)  # stride 0 over B


def _new(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


@torch.library.custom_op("effkernels::rope2d", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    qo, ko = _new(q), _new(k)
    kernel_module("rope", backend).rope2d_fwd(_dense(q), _dense(k), _dense_pos(pos, q),
                                              _inv_freq(q.shape[-1], theta, q.device), _dense(qo), _dense(ko))
    return qo, ko


@_rope_op.register_fake
def _(q, k, pos, theta, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("effkernels::rope2d_backward", mutates_args=())
def _rope_bwd_op(dq_out: torch.Tensor, dk_out: torch.Tensor, pos: torch.Tensor, theta: float,
                 backend: str) -> list[torch.Tensor]:
    # Gradients may arrive with any strides (a sum's are stride 0): the kernels want unit stride along Dh.
    dq_out, dk_out = dq_out.contiguous(), dk_out.contiguous()
    dq, dk = _new(dq_out), _new(dk_out)
    kernel_module("rope", backend).rope2d_bwd(_dense(dq_out), _dense(dk_out), _dense_pos(pos, dq_out),
                                              _inv_freq(dq_out.shape[-1], theta, dq_out.device), _dense(dq), _dense(dk))
    return [dq, dk]


@_rope_bwd_op.register_fake
def _(dq_out, dk_out, pos, theta, backend):
    return [dq_out.new_empty(dq_out.shape), dk_out.new_empty(dk_out.shape)]


def _setup(ctx, inputs, output):
    _q, _k, pos, theta, backend = inputs
    ctx.save_for_backward(pos)
    ctx.theta, ctx.backend = theta, backend


def _bwd(ctx, dq_out, dk_out):
    (pos,) = ctx.saved_tensors
    fad.forbid_tangents("rope2d (its backward)", dq_out, dk_out)
    dq_out = torch.zeros_like(dk_out) if dq_out is None else dq_out
    dk_out = torch.zeros_like(dq_out) if dk_out is None else dk_out
    dq, dk = _rope_bwd_op(dq_out, dk_out, pos, ctx.theta, ctx.backend)
    return dq, dk, None, None, None


_rope_op.register_autograd(_bwd, setup_context=_setup)

_rule = fad.rule("rope2d", _rope_op, outputs=2,
                 jvp=lambda a, out, d: ref.rope2d_jvp(a[0], a[1], a[2], a[3], d[0], d[1]),
                 reference=lambda q, k, pos, theta, backend: ref.rope2d(q, k, pos, theta))


def rope2d(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0, *,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope(q), rope(k)): 2-D axial rotary embedding by each token's (row, column) in pos."""
    theta = _check(q, k, pos, theta)
    be = pick("rope2d", q.device, backend)
    if be == "reference":
        return ref.rope2d(q, k, pos, theta)
    if fad.active():
        return _rule.apply(q, k, pos, theta, be)
    return _rope_op(q, k, pos, theta, be)


def grid_positions(grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(grid_h * grid_w, 2) int64 (row, column) of a row-major patch grid, DiT's token order."""
    for name, v in (("grid_h", grid_h), ("grid_w", grid_w)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return ref.grid_positions(grid_h, grid_w, device)
