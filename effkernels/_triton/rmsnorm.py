"""Triton kernels for the RMSNorm family: RMSNorm + modulate and the fused gated residual + RMSNorm +
modulate, forward and backward.

Primitive contract: see effkernels/ops/rmsnorm.py. The layout is the adaLN family's
(effkernels/_triton/adaln.py, whose tiling, grid, casts and out= checks these launchers reuse):
  grid = (B, n_blocks); program (b, j) walks rows n in [j * rows, min((j + 1) * rows, N)) of sample b
  in tiles of BLOCK_N whole rows (BLOCK_D = next size >= D from the block list, masked tails).
A program stays inside one sample, so per-sample reductions (d(shift), d(scale), d(gate) of (B, D)
modulation) and d(weight) are float32 partial rows, one per program, summed by the launcher in a
fixed order: no atomics, bit-for-bit deterministic backward.

Per-sample (B, D) modulation is read as per-token with token stride 0; the backward kernel takes
runtime flags saying whether each modulation gradient is written per row or accumulated.
aot_specs() lists all 120 variants (3 dtypes x 5 row blocks x 2 kernels x FUSED x HAS_WEIGHT).

The forward primitives take out= (fused_fwd: h_out= and out=) so that tests can hand in
NaN-poisoned buffers, which may be strided row views.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adaln import _BLOCKS, _DTYPES, _cast, _check_float, _grid, _mod_strides, _out, _row_strides, _signature, _tile

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rms_fwd_kernel(X, Y, G, SHIFT, SCALE, W, H, OUT, RSTD,
                    N, D, rows, eps,
                    s_xb, s_xn, s_yb, s_yn, s_gb, s_gn, s_hb, s_hn,
                    s_shb, s_shn, s_scb, s_scn, s_ob, s_on,
                    FUSED: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    for t in range(tl.cdiv(n_end - n0, BLOCK_N)):
        # int64 row index: offsets of tensors over 2**31 elements must not wrap.
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = n < n_end
        mask = rmask[:, None] & cmask[None, :]
        r = n[:, None]
        c = cols[None, :]
        x = tl.load(X + b * s_xb + r * s_xn + c, mask=mask, other=0.0).to(tl.float32)
        if FUSED:
            y = tl.load(Y + b * s_yb + r * s_yn + c, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(G + b * s_gb + r * s_gn + c, mask=mask, other=0.0).to(tl.float32)
            h = _cast(x + g * y, H.dtype.element_ty)
            tl.store(H + b * s_hb + r * s_hn + c, h, mask=mask)
            # The RMSNorm reads h as stored (rounded to x's dtype), like the unfused pair would.
            x = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        yn = x * rstd[:, None]
        if HAS_WEIGHT:
            yn = yn * w[None, :]
        sh = tl.load(SHIFT + b * s_shb + r * s_shn + c, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * s_scb + r * s_scn + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + b * s_ob + r * s_on + c, _cast(yn * (1.0 + sc) + sh, OUT.dtype.element_ty), mask=mask)
        tl.store(RSTD + b * N + n, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(DOUT, DH, X, Y, G, SCALE, W, RSTD,
                    DX, DY, DG, DSHIFT, DSCALE, PART,
                    N, D, rows, n_parts, shift_pt, scale_pt, gate_pt,
                    s_dob, s_don, s_dhb, s_dhn, s_xb, s_xn, s_yb, s_yn, s_gb, s_gn, s_scb, s_scn,
                    FUSED: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # DX, DY and per-token DSHIFT/DSCALE/DG are contiguous (B, N, D) tensors made by the launcher.
    # PART is float32 (4, B * n_parts, D): partial sums of d(shift), d(scale), d(gate), d(weight),
    # one row per program, summed by the launcher.
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n0 = j * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.full((BLOCK_D,), 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_sh = tl.zeros((BLOCK_D,), tl.float32)
    acc_sc = tl.zeros((BLOCK_D,), tl.float32)
    acc_g = tl.zeros((BLOCK_D,), tl.float32)
    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    for t in range(tl.cdiv(n_end - n0, BLOCK_N)):
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = n < n_end
        mask = rmask[:, None] & cmask[None, :]
        r = n[:, None]
        c = cols[None, :]
        out_off = (b * N + r) * D + c
        # Masked rows and columns load zeros everywhere, so they add nothing to any sum below.
        dout = tl.load(DOUT + b * s_dob + r * s_don + c, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + b * s_xb + r * s_xn + c, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * s_scb + r * s_scn + c, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * N + n, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        dyn = dout * (1.0 + sc)
        if shift_pt:
            tl.store(DSHIFT + out_off, _cast(dout, DSHIFT.dtype.element_ty), mask=mask)
        else:
            acc_sh += tl.sum(dout, axis=0)
        if scale_pt:
            tl.store(DSCALE + out_off, _cast(dout * xhat * w[None, :], DSCALE.dtype.element_ty), mask=mask)
        else:
            acc_sc += tl.sum(dout * xhat * w[None, :], axis=0)
        if HAS_WEIGHT:
            acc_w += tl.sum(dyn * xhat, axis=0)
        dxhat = dyn * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        dx = (dxhat - xhat * c1[:, None]) * rstd[:, None]
        if FUSED:
            # h = x + gate * y fed both the next block (dh) and this RMSNorm (dx).
            dx += tl.load(DH + b * s_dhb + r * s_dhn + c, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + b * s_yb + r * s_yn + c, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(G + b * s_gb + r * s_gn + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + out_off, _cast(dx * g, DY.dtype.element_ty), mask=mask)
            if gate_pt:
                tl.store(DG + out_off, _cast(dx * y, DG.dtype.element_ty), mask=mask)
            else:
                acc_g += tl.sum(dx * y, axis=0)
        tl.store(DX + out_off, _cast(dx, DX.dtype.element_ty), mask=mask)
    prow = (b * n_parts + j) * D
    stride_part = n_parts * tl.num_programs(0) * D
    # Only the partials the launcher will sum are written; the others stay untouched.
    if shift_pt == 0:
        tl.store(PART + prow + cols, acc_sh, mask=cmask)
    if scale_pt == 0:
        tl.store(PART + stride_part + prow + cols, acc_sc, mask=cmask)
    if FUSED and gate_pt == 0:
        tl.store(PART + 2 * stride_part + prow + cols, acc_g, mask=cmask)
    if HAS_WEIGHT:
        tl.store(PART + 3 * stride_part + prow + cols, acc_w, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers (the primitives of effkernels/ops/rmsnorm.py)
# ---------------------------------------------------------------------------------------------

def _check_rstd(rstd: torch.Tensor, B: int, N: int) -> None:
    if rstd.shape != (B, N) or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rstd must be a contiguous float32 ({B}, {N}) tensor, got {rstd.dtype} "
                         f"{tuple(rstd.shape)} strides {rstd.stride()}")


def _fwd(x, y, gate, shift, scale, weight, eps, h_out, out):
    fused = y is not None
    _check_float("x", x)
    B, N, D = x.shape
    bn, blk, warps = _tile(D)
    out = _out("out", out, x)
    h = _out("h_out", h_out, x) if fused else out
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    if B * N == 0:
        return h, out, rstd
    gate_s = _mod_strides(gate) if fused else (0, 0)
    y = x if y is None else y
    gate = x if gate is None else gate
    rows, nb = _grid(B, N, bn, x.device)
    _rms_fwd_kernel[(B, nb)](
        x, y, gate, shift, scale, x if weight is None else weight, h, out, rstd, N, D, rows, float(eps),
        *_row_strides(x), *_row_strides(y), *gate_s, *_row_strides(h),
        *_mod_strides(shift), *_mod_strides(scale), *_row_strides(out),
        FUSED=fused, HAS_WEIGHT=weight is not None, BLOCK_N=bn, BLOCK_D=blk, num_warps=warps)
    return h, out, rstd


def _bwd(dh, dout, x, y, gate, shift, scale, weight, rstd):
    fused = dh is not None
    _check_float("x", x)
    B, N, D = x.shape
    bn, blk, warps = _tile(D)
    for name, t in (("dout", dout), ("dh", dh)):
        # An empty tensor has no memory to stride over (autograd hands in expanded ones, stride 0).
        if t is not None and (t.shape != x.shape or t.stride(-1) != 1 and D > 1 and t.numel() > 0):
            raise ValueError(f"{name} must have shape {tuple(x.shape)} and unit last stride, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    _check_rstd(rstd, B, N)
    full = {"dtype": x.dtype, "device": x.device}
    dx = torch.empty((B, N, D), **full)
    dy = torch.empty((B, N, D), **full) if fused else None
    shift_pt, scale_pt = shift.dim() == 3, scale.dim() == 3
    gate_pt = fused and gate.dim() == 3
    dshift = torch.empty((B, N, D), **full) if shift_pt else None
    dscale = torch.empty((B, N, D), **full) if scale_pt else None
    dgate = torch.empty((B, N, D), **full) if gate_pt else None
    rows, nb = _grid(B, N, bn, x.device)
    # Zeros: with N == 0 no program runs and the sums below must still be zeros.
    part = torch.zeros((4, B * nb, D), dtype=torch.float32, device=x.device)
    if B * N > 0:
        dummy = x
        _rms_bwd_kernel[(B, nb)](
            dout, dummy if dh is None else dh, x, dummy if y is None else y, dummy if gate is None else gate,
            scale, dummy if weight is None else weight, rstd,
            dx, dummy if dy is None else dy, dummy if dgate is None else dgate,
            dummy if dshift is None else dshift, dummy if dscale is None else dscale, part,
            N, D, rows, nb, int(shift_pt), int(scale_pt), int(gate_pt),
            *_row_strides(dout), *((0, 0) if dh is None else _row_strides(dh)), *_row_strides(x),
            *((0, 0) if y is None else _row_strides(y)), *((0, 0) if gate is None else _mod_strides(gate)),
            *_mod_strides(scale),
            FUSED=fused, HAS_WEIGHT=weight is not None, BLOCK_N=bn, BLOCK_D=blk, num_warps=warps)

    def per_sample(k, like):
        return part[k].view(B, nb, D).sum(1).to(like.dtype)

    dshift = dshift if shift_pt else per_sample(0, shift)
    dscale = dscale if scale_pt else per_sample(1, scale)
    if fused and not gate_pt:
        dgate = per_sample(2, gate)
    dweight = None if weight is None else part[3].sum(0).to(weight.dtype)
    return dx, dy, dgate, dshift, dscale, dweight


def rms_modulate_fwd(x, shift, scale, weight, eps, out=None):
    """(RMSNorm(x) * (1 + scale) + shift, rstd (B, N) f32)."""
    _, out, rstd = _fwd(x, None, None, shift, scale, weight, eps, None, out)
    return out, rstd


def rms_modulate_bwd(dout, x, shift, scale, weight, rstd):
    """(dx, dshift, dscale, dweight); dweight None when weight is None."""
    dx, _, _, dshift, dscale, dweight = _bwd(None, dout, x, None, None, shift, scale, weight, rstd)
    return dx, dshift, dscale, dweight


def rms_fused_fwd(x, y, gate, shift, scale, weight, eps, *, h_out=None, out=None):
    """(h = x + gate * y, RMSNorm(h) * (1 + scale) + shift, rstd), one pass over x and y."""
    return _fwd(x, y, gate, shift, scale, weight, eps, h_out, out)


def rms_fused_bwd(dh, dout, h, y, gate, shift, scale, weight, rstd):
    """(dx, dy, dgate, dshift, dscale, dweight) of rms_fused_fwd given d(h) and d(out)."""
    return _bwd(dh, dout, h, y, gate, shift, scale, weight, rstd)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels/_triton/aot.py)
# ---------------------------------------------------------------------------------------------

def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    specs = []
    for dt in _DTYPES.values():
        for blk in _BLOCKS:
            bn, _, warps = _tile(blk)
            for fn in (_rms_fwd_kernel, _rms_bwd_kernel):
                for fused in (False, True):
                    for has_w in (False, True):
                        cx = {"FUSED": fused, "HAS_WEIGHT": has_w, "BLOCK_N": bn, "BLOCK_D": blk}
                        specs.append((fn, _signature(fn, dt), cx, {"num_warps": warps}))
    return specs
