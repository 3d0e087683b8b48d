"""Triton kernels for SwiGLU, silu(a) * b: forward and backward.

Primitive contract: see effkernels/ops/swiglu.py. The launchers take a and b as 3-D (B, N, H) row
views with any row strides and unit stride along H (the ops wrapper brings (..., H) inputs to that
form without copying; the halves of one (B, N, 2H) projection have row stride 2H). Layout:
  grid = (B, n_blocks, cdiv(H, BLOCK_H)); program (b, j, c) walks rows n in
  [j * rows, min((j + 1) * rows, N)) of sample b, columns [c * BLOCK_H, (c + 1) * BLOCK_H), in tiles
  of BLOCK_N rows (BLOCK_H from a fixed list, masked row and column tails).
Arithmetic in float32, results stored in a's dtype. Elementwise: no reductions, so the backward is
deterministic by construction. aot_specs() lists all 24 variants (3 dtypes x 4 column blocks x
2 kernels). The forward takes out= so tests can hand in NaN-poisoned (strided) buffers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adaln import _DTYPES, _cast, _check_float, _grid, _out, _row_strides

_COL_BLOCKS = (16, 64, 256, 1024)
_TILE = 2048  # elements per tile: BLOCK_N = _TILE // BLOCK_H rows


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(A, B, OUT, N, H, rows, s_ab, s_an, s_bb, s_bn, s_ob, s_on,
                       BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    bi = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    for t in range(tl.cdiv(n_end - n0, BLOCK_N)):
        # int64 row index: offsets of tensors over 2**31 elements must not wrap.
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (n < n_end)[:, None] & cmask[None, :]
        r = n[:, None]
        c = cols[None, :]
        a = tl.load(A + bi * s_ab + r * s_an + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + bi * s_bb + r * s_bn + c, mask=mask, other=0.0).to(tl.float32)
        out = a * tl.sigmoid(a) * b
        tl.store(OUT + bi * s_ob + r * s_on + c, _cast(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, A, B, DA, DB, N, H, rows, s_db, s_dn, s_ab, s_an, s_bb, s_bn,
                       BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    # DA and DB are contiguous (B, N, H) tensors made by the launcher.
    bi = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    for t in range(tl.cdiv(n_end - n0, BLOCK_N)):
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (n < n_end)[:, None] & cmask[None, :]
        r = n[:, None]
        c = cols[None, :]
        g = tl.load(DOUT + bi * s_db + r * s_dn + c, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + bi * s_ab + r * s_an + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + bi * s_bb + r * s_bn + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        off = (bi * N + r) * H + c
        tl.store(DA + off, _cast(g * b * s * (1.0 + a * (1.0 - s)), DA.dtype.element_ty), mask=mask)
        tl.store(DB + off, _cast(g * a * s, DB.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (the primitives of effkernels/ops/swiglu.py)
# ---------------------------------------------------------------------------------------------

def _tile(h: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_H): the smallest column block of the list holding a row (the largest for
    wider rows, which then span several programs), BLOCK_N rows to fill a tile of _TILE elements."""
    blk = next((c for c in _COL_BLOCKS if c >= h), _COL_BLOCKS[-1])
    return _TILE // blk, blk


def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dim() != 3 or t.shape != like.shape or (t.shape[-1] > 1 and t.stride(-1) != 1):
        raise ValueError(f"{name} must be a (B, N, H)={tuple(like.shape)} row view with unit last stride, got "
                         f"{tuple(t.shape)} strides {t.stride()}")


def swiglu_fwd(a, b, out=None):
    """silu(a) * b for (B, N, H) row views a, b; float32 arithmetic, stored in a's dtype."""
    _check_float("a", a)
    _check_rows("a", a, a)
    _check_rows("b", b, a)
    Bs, N, H = a.shape
    out = _out("out", out, a)
    if a.numel() == 0:
        return out
    bn, blk = _tile(H)
    rows, nb = _grid(Bs, N, bn, a.device)
    _swiglu_fwd_kernel[(Bs, nb, triton.cdiv(H, blk))](
        a, b, out, N, H, rows, *_row_strides(a), *_row_strides(b), *_row_strides(out),
        BLOCK_N=bn, BLOCK_H=blk, num_warps=4)
    return out


def swiglu_bwd(dout, a, b):
    """(da, db) of silu(a) * b, contiguous (B, N, H) in a's dtype."""
    _check_float("a", a)
    _check_rows("dout", dout, a)
    _check_rows("b", b, a)
    Bs, N, H = a.shape
    da = torch.empty((Bs, N, H), dtype=a.dtype, device=a.device)
    db = torch.empty_like(da)
    if a.numel() == 0:
        return da, db
    bn, blk = _tile(H)
    rows, nb = _grid(Bs, N, bn, a.device)
    _swiglu_bwd_kernel[(Bs, nb, triton.cdiv(H, blk))](
        dout, a, b, da, db, N, H, rows, *_row_strides(dout), *_row_strides(a), *_row_strides(b),
        BLOCK_N=bn, BLOCK_H=blk, num_warps=4)
    return da, db


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels/_triton/aot.py)
# ---------------------------------------------------------------------------------------------

_PTRS = ("A", "B", "OUT", "DOUT", "DA", "DB")


def _signature(fn, dt: str) -> dict:
    """_PTRS = pointers of the tensors' dtype, BLOCK_* = constexpr, the rest (N, H, rows, strides) i32."""
    return {n: "constexpr" if n.startswith("BLOCK_") else (f"*{dt}" if n in _PTRS else "i32") for n in fn.arg_names}


def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    specs = []
    for dt in _DTYPES.values():
        for blk in _COL_BLOCKS:
            cx = {"BLOCK_N": _TILE // blk, "BLOCK_H": blk}
            for fn in (_swiglu_fwd_kernel, _swiglu_bwd_kernel):
                specs.append((fn, _signature(fn, dt), cx, {"num_warps": 4}))
    return specs
