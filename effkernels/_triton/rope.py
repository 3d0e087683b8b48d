"""Triton kernel for the 2-D axial rotary embedding of q and k: forward and backward (one kernel).

Primitive contract: see effkernels/ops/rope.py. The launchers take q, k as 4-D (B, H, N, Dh) views
with any strides and unit stride along Dh (the packed (T, H, Dh) form arrives as the view
(1, H, T, Dh)), pos as a (B, N, 2) int32/int64 view (token stride 0 over B for a shared (N, 2)),
and inv_freq, the (Dh / 2,) float32 inverse frequency per pair (reference.rope.rope2d_inv_freq).
Layout:
  grid = (B, n_blocks); program (b, j) walks tokens n in [j * rows, min((j + 1) * rows, N)) of
  sample b in tiles of BLOCK_N tokens x BLOCK_P pairs, computes each tile's cos/sin once and
  rotates every head of q and of k with them.
Pairs (x[2k], x[2k + 1]) are read as two stride-2 loads. The backward is the rotation by minus
the angle (the map is orthogonal): the same kernel with sin_sign = -1. Arithmetic in float32,
results stored in q's dtype; elementwise, so deterministic. aot_specs() lists all 36 variants
(3 dtypes x 2 position dtypes x 6 pair blocks). Both launchers take their outputs as views
(the packed form's are (1, H, T, Dh) views of (T, H, Dh) tensors; tests hand in NaN-poisoned ones).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adaln import _DTYPES, _cast, _check_float, _grid

_PAIR_BLOCKS = (8, 16, 32, 64, 128, 256)  # BLOCK_P: head dims up to 512
_TILE = 1024  # pairs per tile: BLOCK_N = _TILE // BLOCK_P tokens
_POS_DTYPES = {torch.int32: "i32", torch.int64: "i64"}


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rope_kernel(Q, K, QO, KO, POS, FREQ, N, HEADS, P, PR, rows, sin_sign,
                 s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_qob, s_qoh, s_qon, s_kob, s_koh, s_kon, s_pb, s_pn, s_pc,
                 BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * rows
    n_end = tl.minimum(n0 + rows, N)
    k = tl.arange(0, BLOCK_P)
    kmask = k < P
    inv = tl.load(FREQ + k, mask=kmask, other=0.0)
    is_row = (k < PR)[None, :]
    e = (2 * k)[None, :]
    for t in range(tl.cdiv(n_end - n0, BLOCK_N)):
        # int64 token index: offsets of tensors over 2**31 elements must not wrap.
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        nmask = n < n_end
        mask = nmask[:, None] & kmask[None, :]
        r = n[:, None]
        prow = tl.load(POS + b * s_pb + n * s_pn, mask=nmask, other=0).to(tl.float32)
        pcol = tl.load(POS + b * s_pb + n * s_pn + s_pc, mask=nmask, other=0).to(tl.float32)
        ang = tl.where(is_row, prow[:, None], pcol[:, None]) * inv[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang) * sin_sign
        for h in range(HEADS):
            qb = Q + b * s_qb + h * s_qh + r * s_qn + e
            x0 = tl.load(qb, mask=mask, other=0.0).to(tl.float32)
            x1 = tl.load(qb + 1, mask=mask, other=0.0).to(tl.float32)
            ob = QO + b * s_qob + h * s_qoh + r * s_qon + e
            tl.store(ob, _cast(x0 * c - x1 * s, QO.dtype.element_ty), mask=mask)
            tl.store(ob + 1, _cast(x1 * c + x0 * s, QO.dtype.element_ty), mask=mask)
            kb = K + b * s_kb + h * s_kh + r * s_kn + e
            y0 = tl.load(kb, mask=mask, other=0.0).to(tl.float32)
            y1 = tl.load(kb + 1, mask=mask, other=0.0).to(tl.float32)
            ob = KO + b * s_kob + h * s_koh + r * s_kon + e
            tl.store(ob, _cast(y0 * c - y1 * s, KO.dtype.element_ty), mask=mask)
            tl.store(ob + 1, _cast(y1 * c + y0 * s, KO.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (the primitives of effkernels/ops/rope.py)
# ---------------------------------------------------------------------------------------------

def _block_p(p: int) -> int:
    for blk in _PAIR_BLOCKS:
        if blk >= p:
            return blk
    raise ValueError(f"q's head dim Dh={2 * p} exceeds the triton backend's largest {2 * _PAIR_BLOCKS[-1]}")


def _check_qk(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dim() != 4 or t.shape != like.shape or t.dtype != like.dtype or t.stride(-1) != 1:
        raise ValueError(f"{name} must be a {like.dtype} (B, H, N, Dh)={tuple(like.shape)} view with unit last "
                         f"stride, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")


def _out4(name: str, out, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if out.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {out.device}")
    _check_qk(name, out, like)
    return out


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch(q, k, pos, inv_freq, q_out, k_out, sin_sign):
    _check_float("q", q)
    _check_qk("q", q, q)
    _check_qk("k", k, q)
    B, H, N, Dh = q.shape
    if Dh % 2:
        raise ValueError(f"q's head dim must be even, got Dh={Dh}")
    P = Dh // 2
    blk = _block_p(P)
    if pos.dim() != 3 or pos.shape[0] != B or pos.shape[1] != N or pos.shape[2] != 2 or pos.dtype not in _POS_DTYPES:
        raise ValueError(f"pos must be an int32/int64 (B, N, 2)=({B}, {N}, 2) view, got {pos.dtype} {tuple(pos.shape)}")
    if inv_freq.shape != (P,) or inv_freq.dtype != torch.float32 or not inv_freq.is_contiguous():
        raise ValueError(f"inv_freq must be a contiguous float32 ({P},) tensor, got {inv_freq.dtype} "
                         f"{tuple(inv_freq.shape)}")
    q_out, k_out = _out4("q_out", q_out, q), _out4("k_out", k_out, q)
    if q.numel() == 0:
        return q_out, k_out
    bn = _TILE // blk
    rows, nb = _grid(B, N, bn, q.device)
    _rope_kernel[(B, nb)](
        q, k, q_out, k_out, pos, inv_freq, N, H, P, P - P // 2, rows, float(sin_sign),
        *_strides3(q), *_strides3(k), *_strides3(q_out), *_strides3(k_out),
        pos.stride(0), pos.stride(1), pos.stride(2), BLOCK_N=bn, BLOCK_P=blk, num_warps=4)
    return q_out, k_out


def rope2d_fwd(q, k, pos, inv_freq, q_out=None, k_out=None):
    """(rope(q), rope(k)) for (B, H, N, Dh) views q, k and (B, N, 2) positions; contiguous by default."""
    return _launch(q, k, pos, inv_freq, q_out, k_out, 1.0)


def rope2d_bwd(dq_out, dk_out, pos, inv_freq, dq=None, dk=None):
    """(dq, dk): the inverse rotation of the output gradients; contiguous (B, H, N, Dh) by default."""
    return _launch(dq_out, dk_out, pos, inv_freq, dq, dk, -1.0)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels/_triton/aot.py)
# ---------------------------------------------------------------------------------------------

def _signature(dt: str, pt: str) -> dict:
    sig = {}
    for n in _rope_kernel.arg_names:
        if n.startswith("BLOCK_"):
            sig[n] = "constexpr"
        elif n in ("Q", "K", "QO", "KO"):
            sig[n] = f"*{dt}"
        elif n == "POS":
            sig[n] = f"*{pt}"
        elif n == "FREQ":
            sig[n] = "*fp32"
        elif n == "sin_sign":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    return [(_rope_kernel, _signature(dt, pt), {"BLOCK_N": _TILE // blk, "BLOCK_P": blk}, {"num_warps": 4})
            for dt in _DTYPES.values() for pt in _POS_DTYPES.values() for blk in _PAIR_BLOCKS]
