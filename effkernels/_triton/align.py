"""Triton kernels for the per-token cosine similarity of the REPA / ERW / SRA alignment losses.

Primitives (contract in effkernels/ops/align.py):
  cosine_fwd(z_hat, z, eps, out=None)        -> cos (B, N) float32
  cosine_bwd(dcos, z_hat, z, eps, out=None)  -> d z_hat, z_hat's dtype and layout (empty_like, which
                                                 is what the op's fake tensor promises)
  proj_cosine_fwd / proj_cosine_bwd           the projector's last Linear fused in: align_proj.py

cos = <z_hat, z> / (max(|z_hat|, e) * max(|z|, e)), F.normalize's clamp, so a zero row gives 0, with
e = max(eps, finfo(z_hat.dtype).tiny) (reference.align.norm_clamp: keeps a zero fp16 row's gradient,
up to |dcos| / e, finite). The launchers raise eps to e; the kernels take it as given.
One program per block of BLOCK_R rows; the dot product and both squared norms are accumulated in
float32 in the same sweep over D (BLOCK_D columns at a time). Rows may have any strides (a token
slice of a larger buffer, a transposed batch) as long as D is unit-stride, which ops guarantees.
z_hat and z may have different dtypes; each is upcast on load.

Backward, with a = max(|z_hat|, e), c = max(|z|, e), g = [|z_hat| >= e] (the clamp passes
its gradient only where it does not clamp, as torch's clamp_min does, equality included):
  d z_hat = dcos * (z / (a c) - g cos z_hat / a^2)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import align_proj as _proj
from .align_proj import proj_cosine_bwd, proj_cosine_fwd  # noqa: F401  (primitives of this family)

# (BLOCK_D, BLOCK_R): ~2048 elements per tile, so short rows get many rows per program and a long
# row (D up to 1024 in one chunk) still leaves each of the 128 threads only a few registers' worth.
# D past 1024 loops over 1024-wide chunks (REPA's DINOv2-g targets have D = 1536).
_BLOCKS = ((32, 64), (128, 16), (512, 4), (1024, 2))
_NUM_WARPS = 4
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _row_offsets(rows, N, sb, sn):
    return (rows // N) * sb + (rows % N) * sn


@triton.jit
def _row_stats(ZH, Z, off_h, off_z, rmask, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(<z_hat, z>, |z_hat|^2, |z|^2) per row in float32, one sweep over D."""
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    nh = tl.zeros([BLOCK_R], dtype=tl.float32)
    nz = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        h = tl.load(ZH + off_h[:, None] + cols[None, :], mask=m, other=0).to(tl.float32)
        t = tl.load(Z + off_z[:, None] + cols[None, :], mask=m, other=0).to(tl.float32)
        dot += tl.sum(h * t, axis=1)
        nh += tl.sum(h * h, axis=1)
        nz += tl.sum(t * t, axis=1)
    return dot, nh, nz


@triton.jit
def _cos_fwd_kernel(ZH, Z, OUT, R, N, D, s_hb, s_hn, s_zb, s_zn, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    dot, nh, nz = _row_stats(ZH, Z, _row_offsets(rows, N, s_hb, s_hn), _row_offsets(rows, N, s_zb, s_zn),
                             rmask, D, BLOCK_R, BLOCK_D)
    a = tl.maximum(tl.sqrt_rn(nh), eps)
    c = tl.maximum(tl.sqrt_rn(nz), eps)
    tl.store(OUT + rows, dot / (a * c), mask=rmask)


@triton.jit
def _cos_bwd_kernel(DCOS, ZH, Z, DZH, R, N, D, s_db, s_dn, s_hb, s_hn, s_zb, s_zn, s_ob, s_on, eps,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    off_h = _row_offsets(rows, N, s_hb, s_hn)
    off_z = _row_offsets(rows, N, s_zb, s_zn)
    out_row = _row_offsets(rows, N, s_ob, s_on)
    dcos = tl.load(DCOS + _row_offsets(rows, N, s_db, s_dn), mask=rmask, other=0).to(tl.float32)
    if SINGLE:
        # The whole row fits one tile: keep it in registers between the statistics and the write.
        cols = tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        h = tl.load(ZH + off_h[:, None] + cols[None, :], mask=m, other=0).to(tl.float32)
        t = tl.load(Z + off_z[:, None] + cols[None, :], mask=m, other=0).to(tl.float32)
        dot = tl.sum(h * t, axis=1)
        nh = tl.sum(h * h, axis=1)
        nz = tl.sum(t * t, axis=1)
    else:
        dot, nh, nz = _row_stats(ZH, Z, off_h, off_z, rmask, D, BLOCK_R, BLOCK_D)
    norm_h = tl.sqrt_rn(nh)
    a = tl.maximum(norm_h, eps)
    c = tl.maximum(tl.sqrt_rn(nz), eps)
    cos = dot / (a * c)
    coef_t = dcos / (a * c)
    coef_h = tl.where(norm_h >= eps, dcos * cos / (a * a), 0.0)
    if SINGLE:
        dh = coef_t[:, None] * t - coef_h[:, None] * h
        tl.store(DZH + out_row[:, None] + cols[None, :], dh.to(DZH.dtype.element_ty), mask=m)
    else:
        # Second sweep re-reads the row chunks (from L2 for moderate D) instead of holding them.
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            m = rmask[:, None] & (cols < D)[None, :]
            h = tl.load(ZH + off_h[:, None] + cols[None, :], mask=m, other=0).to(tl.float32)
            t = tl.load(Z + off_z[:, None] + cols[None, :], mask=m, other=0).to(tl.float32)
            dh = coef_t[:, None] * t - coef_h[:, None] * h
            tl.store(DZH + out_row[:, None] + cols[None, :], dh.to(DZH.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _blocks(d: int) -> tuple[int, int, bool]:
    """(BLOCK_D, BLOCK_R, single chunk) for rows of d elements."""
    for blk, rows in _BLOCKS:
        if d <= blk:
            return blk, rows, True
    blk, rows = _BLOCKS[-1]
    return blk, rows, False


def _check_pair(z_hat, z, eps) -> float:
    """Validate the pair; -> the norm clamp the kernels use."""
    for name, t in (("z_hat", z_hat), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the triton backend, got {t.dtype}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be (B, N, D), got shape {tuple(t.shape)}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")
    if z.shape != z_hat.shape:
        raise ValueError(f"z must have z_hat's shape {tuple(z_hat.shape)}, got {tuple(z.shape)}")
    if z.device != z_hat.device:
        raise ValueError(f"z is on {z.device} but z_hat is on {z_hat.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite positive number, got {eps!r}")
    return max(float(eps), torch.finfo(z_hat.dtype).tiny)  # reference.align.norm_clamp


def _check_out(out, shape, dtype, device, any_rows=False):
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    ok = (out.shape[-1] <= 1 or out.stride(-1) == 1) if any_rows else out.is_contiguous()
    if not ok:
        raise ValueError(f"out must be {'unit-stride along D' if any_rows else 'contiguous'}, "
                         f"got strides {out.stride()}")


def cosine_fwd(z_hat: torch.Tensor, z: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cosine similarity over D in float32: (B, N, D), (B, N, D) -> (B, N)."""
    eps = _check_pair(z_hat, z, eps)
    B, N, D = z_hat.shape
    if out is None:
        out = torch.empty((B, N), dtype=torch.float32, device=z_hat.device)
    _check_out(out, (B, N), torch.float32, z_hat.device)
    R = B * N
    if R == 0:
        return out
    if D == 0:
        return out.zero_()
    blk, rows, _ = _blocks(D)
    _cos_fwd_kernel[(triton.cdiv(R, rows),)](
        z_hat, z, out, R, N, D, z_hat.stride(0), z_hat.stride(1), z.stride(0), z.stride(1), eps,
        BLOCK_R=rows, BLOCK_D=blk, num_warps=_NUM_WARPS)
    return out


def cosine_bwd(dcos: torch.Tensor, z_hat: torch.Tensor, z: torch.Tensor, eps: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """d z_hat from d cos (B, N) float32, any strides (an expanded mean gradient has stride 0)."""
    eps = _check_pair(z_hat, z, eps)
    B, N, D = z_hat.shape
    if not isinstance(dcos, torch.Tensor) or dcos.dtype != torch.float32:
        raise TypeError(f"dcos must be a float32 tensor, got {getattr(dcos, 'dtype', type(dcos).__name__)}")
    if tuple(dcos.shape) != (B, N) or dcos.device != z_hat.device:
        raise ValueError(f"dcos must have shape {(B, N)} on {z_hat.device}, got {tuple(dcos.shape)} on {dcos.device}")
    if out is None:
        # empty_like keeps a dense permuted z_hat's layout: the registered fake promises exactly that.
        out = torch.empty_like(z_hat)
    _check_out(out, (B, N, D), z_hat.dtype, z_hat.device, any_rows=True)
    R = B * N
    if out.numel() == 0:
        return out
    blk, rows, single = _blocks(D)
    _cos_bwd_kernel[(triton.cdiv(R, rows),)](
        dcos, z_hat, z, out, R, N, D, dcos.stride(0), dcos.stride(1), z_hat.stride(0), z_hat.stride(1),
        z.stride(0), z.stride(1), out.stride(0), out.stride(1), eps, BLOCK_R=rows, BLOCK_D=blk, SINGLE=single, num_warps=_NUM_WARPS)
    return out


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels._triton.aot)
# ---------------------------------------------------------------------------------------------

def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    specs = []
    opts = {"num_warps": _NUM_WARPS}
    cfgs = [(blk, rows, True) for blk, rows in _BLOCKS] + [(_BLOCKS[-1][0], _BLOCKS[-1][1], False)]
    for th in _DTYPES.values():
        for tz in _DTYPES.values():
            ptrs = {"ZH": f"*{th}", "Z": f"*{tz}"}
            ints = {k: "i32" for k in ("R", "N", "D")}
            strides = {k: "i32" for k in ("s_hb", "s_hn", "s_zb", "s_zn")}
            for blk, rows, single in cfgs:
                cx = {"BLOCK_R": rows, "BLOCK_D": blk}
                if single:  # the forward loops over D whatever its length: one config per block
                    sig = {**ptrs, "OUT": "*fp32", **ints, **strides, "eps": "fp32",
                           "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
                    specs.append((_cos_fwd_kernel, sig, cx, opts))
                sig = {"DCOS": "*fp32", **ptrs, "DZH": f"*{th}", **ints, "s_db": "i32", "s_dn": "i32",
                       **strides, "s_ob": "i32", "s_on": "i32", "eps": "fp32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
                       "SINGLE": "constexpr"}
                specs.append((_cos_bwd_kernel, sig, {**cx, "SINGLE": single}, opts))
    return specs + _proj.aot_specs()
