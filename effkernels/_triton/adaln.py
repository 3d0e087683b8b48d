"""Triton kernels for the adaLN family: LayerNorm + modulate, gated residual, and the fused pair;
and, with the constexpr RMS, the RMSNorm variants of the two norm kernels (launched by
effkernels/_triton/rmsnorm.py): mean 0 (neither computed nor stored), no bias, and no sum(g) term in
the backward, with the tiling, modulation, partial sums and casts shared.

Primitive contract: see effkernels/ops/adaln.py. Layout of every kernel here:
  grid = (B, n_blocks); program (b, j) walks rows n in [j * rows, min((j + 1) * rows, N)) of sample b
  in tiles of BLOCK_N whole rows (BLOCK_D = next size >= D from _BLOCKS, masked row and column tails).
Keeping a program inside one sample makes a per-sample reduction (d(shift), d(scale), d(gate) of
(B, D) modulation) a sum over that program's rows only: each program writes one float32 row of a
(B * n_blocks, D) partial buffer and torch sums it afterwards. No atomics, so backward is
bit-for-bit deterministic.

Per-sample (B, D) modulation is read as per-token with token stride 0, so the forward kernels need
no variant for it; the backward kernels take runtime flags saying whether each gradient is written
per row (per-token) or accumulated (per-sample), which keeps the compiled variant set small:
aot_specs() lists all 270 (3 dtypes x 5 row blocks x (2 gated-residual + 8 LayerNorm + 8 RMSNorm kernels)).

Beyond the contract, the forward primitives take out= (fused_fwd: h_out= and out=) so that tests
can hand in NaN-poisoned buffers, which may be strided row views.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_BLOCKS = (512, 1024, 2048, 4096, 8192)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# How many programs a launch aims for: enough to fill an H100 on the GPU; on the CPU interpreter each
# program costs ~3 ms, so few programs with longer row loops are far faster.
_TARGET_PROGRAMS_GPU = 1024
_TARGET_PROGRAMS_CPU = 4


# Triton's CPU interpreter truncates float32 -> bfloat16 casts where the GPU rounds to nearest even;
# under the interpreter _cast rounds by hand so that bf16 results match the GPU and PyTorch.
_INTERPRETER: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _cast(v, dst: tl.constexpr):
    res = v.to(dst)
    if _INTERPRETER:
        if dst == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            # NaN stays NaN even where the rounding increment would wrap its bit pattern.
            res = tl.where(v != v, res, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True))
    return res


@triton.jit
def _ln_fwd_kernel(X, Y, G, SHIFT, SCALE, W, BIAS, H, OUT, MEAN, RSTD,
                   N, D, rows, eps,
                   s_xb, s_xn, s_yb, s_yn, s_gb, s_gn, s_hb, s_hn,
                   s_shb, s_shn, s_scb, s_scn, s_ob, s_on,
                   FUSED: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    for t in range(0, tl.cdiv(n_end - n0, BLOCK_N)):
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
            # The LayerNorm reads h as stored (rounded to x's dtype), like the unfused pair would.
            x = h.to(tl.float32)
        if RMS:
            xc = x  # masked elements loaded as 0
        else:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        yln = xc * rstd[:, None]
        if HAS_WEIGHT:
            yln = yln * w[None, :]
        if HAS_BIAS:
            yln = yln + bias[None, :]
        sh = tl.load(SHIFT + b * s_shb + r * s_shn + c, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * s_scb + r * s_scn + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + b * s_ob + r * s_on + c, _cast(yln * (1.0 + sc) + sh, OUT.dtype.element_ty), mask=mask)
        if not RMS:
            tl.store(MEAN + b * N + n, mean, mask=rmask)
        tl.store(RSTD + b * N + n, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DOUT, DH, X, Y, G, SCALE, W, BIAS, MEAN, RSTD,
                   DX, DY, DG, DSHIFT, DSCALE, PART,
                   N, D, rows, n_parts, shift_pt, scale_pt, gate_pt,
                   s_dob, s_don, s_dhb, s_dhn, s_xb, s_xn, s_yb, s_yn, s_gb, s_gn, s_scb, s_scn,
                   FUSED: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Outputs DX, DY and per-token DSHIFT/DSCALE/DG are contiguous (B, N, D) tensors made by the
    # launcher. PART is float32 (5, B * n_parts, D): partial sums of d(shift), d(scale), d(gate),
    # d(weight), d(bias), one row per program, summed by the launcher.
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n0 = j * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.full((BLOCK_D,), 1.0, tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_sh = tl.zeros((BLOCK_D,), tl.float32)
    acc_sc = tl.zeros((BLOCK_D,), tl.float32)
    acc_g = tl.zeros((BLOCK_D,), tl.float32)
    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    acc_b = tl.zeros((BLOCK_D,), tl.float32)
    for t in range(0, tl.cdiv(n_end - n0, BLOCK_N)):
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rmask = n < n_end
        mask = rmask[:, None] & cmask[None, :]
        r = n[:, None]
        c = cols[None, :]
        out_off = (b * N + r) * D + c
        # Masked rows load zeros everywhere, so they add nothing to any partial sum below.
        dout = tl.load(DOUT + b * s_dob + r * s_don + c, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + b * s_xb + r * s_xn + c, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * s_scb + r * s_scn + c, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * N + n, mask=rmask, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]  # masked elements loaded as 0
        else:
            mean = tl.load(MEAN + b * N + n, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        yln = xhat * w[None, :] + bias[None, :]
        dyln = dout * (1.0 + sc)
        if shift_pt:
            tl.store(DSHIFT + out_off, _cast(dout, DSHIFT.dtype.element_ty), mask=mask)
        else:
            acc_sh += tl.sum(dout, axis=0)
        if scale_pt:
            tl.store(DSCALE + out_off, _cast(dout * yln, DSCALE.dtype.element_ty), mask=mask)
        else:
            acc_sc += tl.sum(dout * yln, axis=0)
        if HAS_WEIGHT:
            acc_w += tl.sum(dyln * xhat, axis=0)
        if HAS_BIAS:
            acc_b += tl.sum(dyln, axis=0)
        dxhat = dyln * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / D
        if RMS:
            dx = (dxhat - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(dxhat, axis=1) / D
            dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if FUSED:
            # h = x + gate * y fed both the next block (dh) and this LayerNorm (dx).
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
    if FUSED:
        if gate_pt == 0:
            tl.store(PART + 2 * stride_part + prow + cols, acc_g, mask=cmask)
    if HAS_WEIGHT:
        tl.store(PART + 3 * stride_part + prow + cols, acc_w, mask=cmask)
    if HAS_BIAS:
        tl.store(PART + 4 * stride_part + prow + cols, acc_b, mask=cmask)


@triton.jit
def _gr_fwd_kernel(X, Y, G, OUT, N, D, rows, s_xb, s_xn, s_yb, s_yn, s_gb, s_gn, s_ob, s_on,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    for t in range(0, tl.cdiv(n_end - n0, BLOCK_N)):
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (n < n_end)[:, None] & cmask[None, :]
        r = n[:, None]
        c = cols[None, :]
        x = tl.load(X + b * s_xb + r * s_xn + c, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * s_yb + r * s_yn + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + b * s_gb + r * s_gn + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + b * s_ob + r * s_on + c, _cast(x + g * y, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gr_bwd_kernel(DOUT, Y, G, DY, DG, PART, N, D, rows, n_parts, gate_pt,
                   s_dob, s_don, s_yb, s_yn, s_gb, s_gn, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    n0 = j * rows
    n_end = tl.minimum(n0 + rows, N)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc_g = tl.zeros((BLOCK_D,), tl.float32)
    for t in range(0, tl.cdiv(n_end - n0, BLOCK_N)):
        n = (n0 + t * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (n < n_end)[:, None] & cmask[None, :]
        r = n[:, None]
        c = cols[None, :]
        out_off = (b * N + r) * D + c
        dout = tl.load(DOUT + b * s_dob + r * s_don + c, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * s_yb + r * s_yn + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + b * s_gb + r * s_gn + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + out_off, _cast(dout * g, DY.dtype.element_ty), mask=mask)
        if gate_pt:
            tl.store(DG + out_off, _cast(dout * y, DG.dtype.element_ty), mask=mask)
        else:
            acc_g += tl.sum(dout * y, axis=0)
    if gate_pt == 0:
        tl.store(PART + (b * n_parts + j) * D + cols, acc_g, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers (the primitives of effkernels/ops/adaln.py)
# ---------------------------------------------------------------------------------------------

def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name}: the triton backend supports float32, float16 and bfloat16, got {t.dtype}")


def _tile(d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps). BLOCK_D: the smallest block of the fixed list holding a whole
    row; BLOCK_N rows per tile so that a tile has >= 2048 elements (narrow rows would otherwise leave
    most threads idle); 8 elements per thread per tile tensor, up to 32 warps (the 8192 block needs
    them: at 16 warps the backward's eleven live row vectors spill ~1 KiB per thread on sm_90, at 32
    about half that). All three are functions of BLOCK_D, so the AOT set grows with the block list only."""
    if d < 1:
        raise ValueError(f"x must have a last dim D >= 1, got D={d}")
    for blk in _BLOCKS:
        if blk >= d:
            bn = max(1, 2048 // blk)
            return bn, blk, min(32, max(4, bn * blk // 256))
    raise ValueError(f"x's last dim D={d} exceeds the triton backend's largest row block {_BLOCKS[-1]}")


def _grid(B: int, N: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, a multiple of block_n; programs per sample). A program never spans two
    samples."""
    target = _TARGET_PROGRAMS_GPU if device.type == "cuda" else _TARGET_PROGRAMS_CPU
    per_sample = max(1, -(-target // max(B, 1)))
    rows = max(1, -(-N // per_sample))
    rows = -(-rows // block_n) * block_n
    return rows, -(-N // rows)


def _mod_strides(m: torch.Tensor) -> tuple[int, int]:
    # A per-sample (B, D) modulation is a per-token one whose token stride is 0.
    return (m.stride(0), m.stride(1)) if m.dim() == 3 else (m.stride(0), 0)


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _out(name: str, out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be a {like.dtype} tensor of shape {tuple(like.shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {out.stride()}")
    return out


def _check_stats(mean: torch.Tensor | None, rstd: torch.Tensor, B: int, N: int) -> None:
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is None:  # RMSNorm
            continue
        if t.shape != (B, N) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 ({B}, {N}) tensor, got {t.dtype} "
                             f"{tuple(t.shape)} strides {t.stride()}")


def _norm_params(weight, bias, D, like, rms):
    """(weight, bias, HAS_WEIGHT, HAS_BIAS) for the kernels, absent ones replaced by `like`.
    LayerNorm: a lone weight or bias gets an identity partner (ones / zeros), so its kernels are only
    ever compiled with HAS_WEIGHT == HAS_BIAS: half the AOT variants, at the cost of one D-vector in a
    configuration DiT does not use. RMSNorm has a weight or not, and never a bias."""
    if rms:
        return (like if weight is None else weight), like, weight is not None, False
    if weight is None and bias is None:
        return like, like, False, False
    if weight is None:
        weight = torch.ones(D, dtype=bias.dtype, device=bias.device)
    if bias is None:
        bias = torch.zeros(D, dtype=weight.dtype, device=weight.device)
    return weight, bias, True, True


def _ln_fwd(x, y, gate, shift, scale, weight, bias, eps, h_out, out, rms=False):
    """(h, out, mean, rstd); rms: the RMSNorm variant (bias None), whose mean is None."""
    fused = y is not None
    _check_float("x", x)
    B, N, D = x.shape
    bn, blk, warps = _tile(D)
    out = _out("out", out, x)
    h = _out("h_out", h_out, x) if fused else out
    rstd = torch.empty((B, N), dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty_like(rstd)
    if B * N == 0:
        return h, out, mean, rstd
    y = x if y is None else y
    gate_s = _mod_strides(gate) if fused else (0, 0)
    gate = x if gate is None else gate
    rows, nb = _grid(B, N, bn, x.device)
    w_k, b_k, has_w, has_b = _norm_params(weight, bias, D, x, rms)
    _ln_fwd_kernel[(B, nb)](
        x, y, gate, shift, scale, w_k, b_k, h, out,
        rstd if rms else mean, rstd, N, D, rows, float(eps),
        *_row_strides(x), *_row_strides(y), *gate_s, *_row_strides(h),
        *_mod_strides(shift), *_mod_strides(scale), *_row_strides(out),
        FUSED=fused, HAS_WEIGHT=has_w, HAS_BIAS=has_b, RMS=rms, BLOCK_N=bn, BLOCK_D=blk, num_warps=warps)
    return h, out, mean, rstd


def _ln_bwd(dh, dout, x, y, gate, shift, scale, weight, bias, mean, rstd, rms=False):
    """(dx, dy, dgate, dshift, dscale, dweight, dbias); rms: the RMSNorm variant (bias and mean None)."""
    fused = dh is not None
    _check_float("x", x)
    B, N, D = x.shape
    bn, blk, warps = _tile(D)
    for name, t in (("dout", dout), ("dh", dh)):
        # An empty tensor has no memory to stride over (autograd hands in expanded ones, stride 0).
        if t is not None and (t.shape != x.shape or t.stride(-1) != 1 and D > 1 and t.numel() > 0):
            raise ValueError(f"{name} must have shape {tuple(x.shape)} and unit last stride, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    _check_stats(mean, rstd, B, N)
    full = dict(dtype=x.dtype, device=x.device)
    dx = torch.empty((B, N, D), **full)
    dy = torch.empty((B, N, D), **full) if fused else None
    shift_pt, scale_pt = shift.dim() == 3, scale.dim() == 3
    gate_pt = fused and gate.dim() == 3
    dshift = torch.empty((B, N, D), **full) if shift_pt else None
    dscale = torch.empty((B, N, D), **full) if scale_pt else None
    dgate = torch.empty((B, N, D), **full) if gate_pt else None
    rows, nb = _grid(B, N, bn, x.device)
    # Zeros: with N == 0 no program runs and the sums below must still be zeros.
    part = torch.zeros((5, B * nb, D), dtype=torch.float32, device=x.device)
    if B * N > 0:
        dummy = x
        w_k, b_k, has_w, has_b = _norm_params(weight, bias, D, x, rms)
        _ln_bwd_kernel[(B, nb)](
            dout, dummy if dh is None else dh, x, dummy if y is None else y, dummy if gate is None else gate,
            scale, w_k, b_k, rstd if rms else mean, rstd,
            dx, dummy if dy is None else dy, dummy if dgate is None else dgate,
            dummy if dshift is None else dshift, dummy if dscale is None else dscale, part,
            N, D, rows, nb, int(shift_pt), int(scale_pt), int(gate_pt),
            *_row_strides(dout), *((0, 0) if dh is None else _row_strides(dh)), *_row_strides(x),
            *((0, 0) if y is None else _row_strides(y)), *((0, 0) if gate is None else _mod_strides(gate)),
            *_mod_strides(scale),
            FUSED=fused, HAS_WEIGHT=has_w, HAS_BIAS=has_b, RMS=rms, BLOCK_N=bn, BLOCK_D=blk, num_warps=warps)

    def per_sample(k, like):
        return part[k].view(B, nb, D).sum(1).to(like.dtype)

    dshift = dshift if shift_pt else per_sample(0, shift)
    dscale = dscale if scale_pt else per_sample(1, scale)
    if fused and not gate_pt:
        dgate = per_sample(2, gate)
    dweight = None if weight is None else part[3].sum(0).to(weight.dtype)
    dbias = None if bias is None else part[4].sum(0).to(bias.dtype)
    return dx, dy, dgate, dshift, dscale, dweight, dbias


def ln_modulate_fwd(x, shift, scale, weight, bias, eps, out=None):
    """(LN(x) * (1 + scale) + shift, mean (B, N) f32, rstd (B, N) f32)."""
    _, out, mean, rstd = _ln_fwd(x, None, None, shift, scale, weight, bias, eps, None, out)
    return out, mean, rstd


def ln_modulate_bwd(dout, x, shift, scale, weight, bias, mean, rstd):
    """(dx, dshift, dscale, dweight, dbias); dweight/dbias None when weight/bias are None."""
    dx, _, _, dshift, dscale, dweight, dbias = _ln_bwd(None, dout, x, None, None, shift, scale, weight, bias,
                                                       mean, rstd)
    return dx, dshift, dscale, dweight, dbias


def fused_fwd(x, y, gate, shift, scale, weight, bias, eps, *, h_out=None, out=None):
    """(h = x + gate * y, LN(h) * (1 + scale) + shift, mean, rstd), one pass over x and y."""
    return _ln_fwd(x, y, gate, shift, scale, weight, bias, eps, h_out, out)


def fused_bwd(dh, dout, h, y, gate, shift, scale, weight, bias, mean, rstd):
    """(dx, dy, dgate, dshift, dscale, dweight, dbias) of fused_fwd given d(h) and d(out)."""
    return _ln_bwd(dh, dout, h, y, gate, shift, scale, weight, bias, mean, rstd)


def gated_residual_fwd(x, y, gate, out=None):
    """x + gate * y, float32 arithmetic, stored in x's dtype."""
    _check_float("x", x)
    B, N, D = x.shape
    bn, blk, warps = _tile(D)
    out = _out("out", out, x)
    if B * N == 0:
        return out
    rows, nb = _grid(B, N, bn, x.device)
    _gr_fwd_kernel[(B, nb)](x, y, gate, out, N, D, rows, *_row_strides(x), *_row_strides(y),
                            *_mod_strides(gate), *_row_strides(out), BLOCK_N=bn, BLOCK_D=blk, num_warps=warps)
    return out


def gated_residual_bwd(dout, y, gate):
    """(dy, dgate) of x + gate * y; dx is dout itself."""
    _check_float("y", y)
    B, N, D = y.shape
    bn, blk, warps = _tile(D)
    if dout.shape != y.shape or (D > 1 and dout.stride(-1) != 1):
        raise ValueError(f"dout must have shape {tuple(y.shape)} and unit last stride, got {tuple(dout.shape)} "
                         f"strides {dout.stride()}")
    gate_pt = gate.dim() == 3
    dy = torch.empty((B, N, D), dtype=y.dtype, device=y.device)
    dgate = torch.empty((B, N, D), dtype=gate.dtype, device=y.device) if gate_pt else None
    rows, nb = _grid(B, N, bn, y.device)
    part = torch.empty((B * nb, D), dtype=torch.float32, device=y.device)
    if B * N > 0:
        _gr_bwd_kernel[(B, nb)](dout, y, gate, dy, dy if dgate is None else dgate, part, N, D, rows, nb,
                                int(gate_pt), *_row_strides(dout), *_row_strides(y), *_mod_strides(gate),
                                BLOCK_N=bn, BLOCK_D=blk, num_warps=warps)
    if not gate_pt:
        dgate = part.view(B, nb, D).sum(1).to(gate.dtype)
    return dy, dgate


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels/_triton/aot.py)
# ---------------------------------------------------------------------------------------------

_F32_PTRS = ("MEAN", "RSTD", "PART")
_CONSTEXPRS = ("FUSED", "HAS_WEIGHT", "HAS_BIAS", "RMS", "BLOCK_N", "BLOCK_D")


def _signature(fn, dt: str) -> dict:
    """Kernel arguments by naming convention: upper case = pointer (float32 for statistics and
    partials, else the tensors' dtype), N, D and lower case = i32 scalars, eps = fp32."""
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name == "eps":
            sig[name] = "fp32"
        elif name in ("N", "D") or not name.isupper():
            sig[name] = "i32"
        else:
            sig[name] = "*fp32" if name in _F32_PTRS else f"*{dt}"
    return sig


def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    specs = []
    for dt in _DTYPES.values():
        for blk in _BLOCKS:
            bn, _, warps = _tile(blk)
            opts = {"num_warps": warps}
            for fn in (_gr_fwd_kernel, _gr_bwd_kernel):
                specs.append((fn, _signature(fn, dt), {"BLOCK_N": bn, "BLOCK_D": blk}, opts))
            for fn in (_ln_fwd_kernel, _ln_bwd_kernel):
                for fused in (False, True):
                    for rms in (False, True):
                        for has_w in (False, True):  # LayerNorm: weight and bias together (_norm_params)
                            cx = {"FUSED": fused, "HAS_WEIGHT": has_w, "HAS_BIAS": has_w and not rms, "RMS": rms,
                                  "BLOCK_N": bn, "BLOCK_D": blk}
                            specs.append((fn, _signature(fn, dt), cx, opts))
    return specs
