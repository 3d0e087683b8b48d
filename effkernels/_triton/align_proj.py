"""Triton kernels for the cosine alignment loss with the projector's last Linear fused in.

Primitives (contract in effkernels/ops/align.py; re-exported by effkernels._triton.align):
  proj_cosine_fwd(h, weight, bias, z, eps, chunk, out=None) -> (cos (B, N), norms (B, N, 2)) float32
  proj_cosine_bwd(dcos, h, weight, bias, z, cos, norms, eps, chunk, out=None) -> (dh, d weight, d bias)

h (B, N, K) with any row strides, weight (Z, K), bias (Z,) or None (same dtype as h), z (B, N, Z).
y = h W^T + bias is never stored whole: the forward keeps per token only cos, |y| and |z| (norms,
which the backward reads instead of a second sweep); the backward recomputes y one chunk of
`chunk` tokens at a time and writes that chunk's dy (chunk x Z, h's dtype) to a scratch buffer:
  _dy kernel: one program per (BLOCK_T tokens, BLOCK_Z features): y tile by tl.dot over K, then
              dy = dcos (z / (a c) - g cos y / a^2), a = max(|y|, e), c = max(|z|, e), g = [|y| >= e]
  _dh kernel: dh rows of the chunk = dy W (one program per (BLOCK_T, BLOCK_K) tile)
  _dw kernel: d weight += dy^T h and d bias += sum dy over the chunk's tokens, into float32
              buffers; one program owns one (BLOCK_Z, BLOCK_K) tile and loops over the chunk's
              tokens, and chunks run in order on the stream, so the sum is deterministic (no atomics).
tl.dot takes the operands in their dtype (fp16/bf16 on tensor cores, fp32 as IEEE fp32, not TF32,
so an fp32 run matches PyTorch's default fp32 matmul) and accumulates in float32; every elementwise
step (bias, z, norms, dy) is float32 whatever the dtype. The shipped set is 16 kernels per arch
(aot_specs): no bias runs as a zero bias, and z is either h's dtype or float32 (_shipped).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# One tile shape for every launch: tl.dot needs each side >= 16, and 64 x 64 fp32 accumulators
# (32 registers a thread at 4 warps) leave room for the operand tiles.
BLOCK_T, BLOCK_Z, BLOCK_K = 64, 64, 64
_NUM_WARPS = 4
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the 16-bit dots ignore it


@triton.jit
def _row_offsets(rows, N, sb, sn):
    return (rows // N) * sb + (rows % N) * sn


@triton.jit
def _proj_tile(H, W, BIAS, hoff, rmask, zc, zmask, K, s_wz, HAS_BIAS: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """y[rows, zc] = h[rows] W[zc]^T (+ bias[zc]) as a float32 (BLOCK_T, BLOCK_Z) tile."""
    acc = tl.zeros([BLOCK_T, BLOCK_Z], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        km = kc < K
        h = tl.load(H + hoff[:, None] + kc[None, :], mask=rmask[:, None] & km[None, :], other=0)
        w = tl.load(W + zc[:, None] * s_wz + kc[None, :], mask=zmask[:, None] & km[None, :], other=0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + zc, mask=zmask, other=0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_kernel(H, W, BIAS, Z, COS, NRM, R, N, K, ZD, s_hb, s_hn, s_wz, s_zb, s_zn, eps,
                HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Z: tl.constexpr,
                BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < R
    hoff = _row_offsets(rows, N, s_hb, s_hn)
    zoff = _row_offsets(rows, N, s_zb, s_zn)
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    ny = tl.zeros([BLOCK_T], dtype=tl.float32)
    nz = tl.zeros([BLOCK_T], dtype=tl.float32)
    for z0 in range(0, ZD, BLOCK_Z):
        zc = z0 + tl.arange(0, BLOCK_Z)
        zmask = zc < ZD
        y = _proj_tile(H, W, BIAS, hoff, rmask, zc, zmask, K, s_wz, HAS_BIAS, BLOCK_T, BLOCK_Z, BLOCK_K, PREC)
        t = tl.load(Z + zoff[:, None] + zc[None, :], mask=rmask[:, None] & zmask[None, :], other=0).to(tl.float32)
        dot += tl.sum(y * t, axis=1)
        ny += tl.sum(y * y, axis=1)
        nz += tl.sum(t * t, axis=1)
    ny = tl.sqrt_rn(ny)
    nz = tl.sqrt_rn(nz)
    tl.store(COS + rows, dot / (tl.maximum(ny, eps) * tl.maximum(nz, eps)), mask=rmask)
    tl.store(NRM + 2 * rows, ny, mask=rmask)
    tl.store(NRM + 2 * rows + 1, nz, mask=rmask)


@triton.jit
def _dy_kernel(DCOS, H, W, BIAS, Z, COS, NRM, DY, r0, R1, N, K, ZD, s_db, s_dn, s_hb, s_hn, s_wz,
               s_zb, s_zn, eps, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Z: tl.constexpr,
               BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    local = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = r0 + local
    rmask = rows < R1
    zc = tl.program_id(1) * BLOCK_Z + tl.arange(0, BLOCK_Z)
    zmask = zc < ZD
    m = rmask[:, None] & zmask[None, :]
    y = _proj_tile(H, W, BIAS, _row_offsets(rows, N, s_hb, s_hn), rmask, zc, zmask, K, s_wz, HAS_BIAS,
                   BLOCK_T, BLOCK_Z, BLOCK_K, PREC)
    t = tl.load(Z + _row_offsets(rows, N, s_zb, s_zn)[:, None] + zc[None, :], mask=m, other=0).to(tl.float32)
    g = tl.load(DCOS + _row_offsets(rows, N, s_db, s_dn), mask=rmask, other=0)
    cos = tl.load(COS + rows, mask=rmask, other=0)
    ny = tl.load(NRM + 2 * rows, mask=rmask, other=1)
    a = tl.maximum(ny, eps)
    c = tl.maximum(tl.load(NRM + 2 * rows + 1, mask=rmask, other=1), eps)
    coef_t = g / (a * c)
    coef_y = tl.where(ny >= eps, g * cos / (a * a), 0.0)
    dy = coef_t[:, None] * t - coef_y[:, None] * y
    tl.store(DY + local[:, None] * ZD + zc[None, :], dy.to(DY.dtype.element_ty), mask=m)


@triton.jit
def _dh_kernel(DY, W, DH, r0, R1, N, K, ZD, s_wz, s_ob, s_on, BLOCK_T: tl.constexpr, BLOCK_Z: tl.constexpr,
               BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    local = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = r0 + local
    rmask = rows < R1
    kc = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = kc < K
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for z0 in range(0, ZD, BLOCK_Z):
        zc = z0 + tl.arange(0, BLOCK_Z)
        zmask = zc < ZD
        dy = tl.load(DY + local[:, None] * ZD + zc[None, :], mask=rmask[:, None] & zmask[None, :], other=0)
        w = tl.load(W + zc[:, None] * s_wz + kc[None, :], mask=zmask[:, None] & kmask[None, :], other=0)
        acc = tl.dot(dy, w, acc, input_precision=PREC)
    out = _row_offsets(rows, N, s_ob, s_on)
    tl.store(DH + out[:, None] + kc[None, :], acc.to(DH.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _dw_kernel(DY, H, DW, DB, r0, R1, N, K, ZD, s_hb, s_hn, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_Z: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    zc = tl.program_id(0) * BLOCK_Z + tl.arange(0, BLOCK_Z)
    kc = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    zmask = zc < ZD
    kmask = kc < K
    acc = tl.zeros([BLOCK_Z, BLOCK_K], dtype=tl.float32)
    dbacc = tl.zeros([BLOCK_Z], dtype=tl.float32)
    for t0 in range(0, R1 - r0, BLOCK_T):
        local = t0 + tl.arange(0, BLOCK_T)
        rows = r0 + local
        rmask = rows < R1
        dy = tl.load(DY + local[:, None] * ZD + zc[None, :], mask=rmask[:, None] & zmask[None, :], other=0)
        h = tl.load(H + _row_offsets(rows, N, s_hb, s_hn)[:, None] + kc[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0)
        acc = tl.dot(tl.trans(dy), h, acc, input_precision=PREC)
        if HAS_BIAS:
            dbacc += tl.sum(dy.to(tl.float32), axis=0)
    m = zmask[:, None] & kmask[None, :]
    off = zc[:, None] * K + kc[None, :]
    # The float32 buffers hold the sum over the chunks before this one (launched earlier on the stream).
    tl.store(DW + off, tl.load(DW + off, mask=m, other=0) + acc, mask=m)
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(DB + zc, tl.load(DB + zc, mask=zmask, other=0) + dbacc, mask=zmask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _check(h, weight, bias, z, eps) -> float:
    """Validate the operands; -> the norm clamp the kernels use (reference.align.norm_clamp of h)."""
    for name, t in (("h", h), ("weight", weight), ("z", z)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the triton backend, got {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")
    if h.dim() != 3 or z.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"h, z must be (B, N, K), (B, N, Z) and weight (Z, K); got {tuple(h.shape)}, "
                         f"{tuple(z.shape)}, {tuple(weight.shape)}")
    if tuple(weight.shape) != (z.shape[2], h.shape[2]) or z.shape[:2] != h.shape[:2]:
        raise ValueError(f"weight must be (Z, K) = {(z.shape[2], h.shape[2])} and z (B, N, Z) with h's (B, N); "
                         f"got weight {tuple(weight.shape)}, z {tuple(z.shape)}, h {tuple(h.shape)}")
    if weight.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        raise TypeError(f"weight and bias must have h's dtype {h.dtype} (tl.dot takes one operand dtype)")
    if weight.numel() == 0:
        raise ValueError(f"weight must have at least one row and column, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a finite positive number, got {eps!r}")
    return max(float(eps), torch.finfo(h.dtype).tiny)


def _check_out(out, shape, dtype, device, name):
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device != device or not out.is_contiguous():
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got {got}")


def _shipped(h, weight, bias, z):
    """(bias, z) as the shipped kernel configurations take them: no bias is a zero bias (its
    gradient dropped), and z of a third dtype (neither h's nor float32) is read as float32 (a copy);
    this keeps the AOT set at 18 kernels per arch instead of 90."""
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=h.dtype, device=h.device)
    if z.dtype not in (h.dtype, torch.float32):
        z = z.float()
    return bias, z


def proj_cosine_fwd(h, weight, bias, z, eps, chunk=None, out=None):
    """(cos (B, N), norms (B, N, 2) = (|y|, |z|)) in float32, y = h W^T + bias never stored.

    `chunk` is the C++ path's (its matmul output is chunk x Z): here one launch covers every token,
    since each program reduces its y tiles in registers."""
    e = _check(h, weight, bias, z, eps)
    B, N, K = h.shape
    ZD = weight.shape[0]
    if out is None:
        out = (torch.empty((B, N), dtype=torch.float32, device=h.device),
               torch.empty((B, N, 2), dtype=torch.float32, device=h.device))
    cos, nrm = out
    _check_out(cos, (B, N), torch.float32, h.device, "out[0] (cos)")
    _check_out(nrm, (B, N, 2), torch.float32, h.device, "out[1] (norms)")
    R = B * N
    if R == 0:
        return cos, nrm
    bias, z = _shipped(h, weight, bias, z)
    _fwd_kernel[(triton.cdiv(R, BLOCK_T),)](
        h, weight, bias, z, cos, nrm, R, N, K, ZD, h.stride(0), h.stride(1),
        weight.stride(0), z.stride(0), z.stride(1), e, HAS_BIAS=True, BLOCK_T=BLOCK_T,
        BLOCK_Z=BLOCK_Z, BLOCK_K=BLOCK_K, PREC=_prec(h.dtype), num_warps=_NUM_WARPS)
    return cos, nrm


def proj_cosine_bwd(dcos, h, weight, bias, z, cos, norms, eps, chunk, out=None):
    """(dh (contiguous, h's dtype), d weight, d bias or None) from dcos (B, N) float32 (any strides).

    `chunk` tokens at a time (rounded up to BLOCK_T): the scratch dy is (chunk, Z) in h's dtype.
    out: a contiguous (B, N, K) buffer for dh (tests poison it).
    """
    e = _check(h, weight, bias, z, eps)
    B, N, K = h.shape
    ZD = weight.shape[0]
    for name, t, shape in (("dcos", dcos, (B, N)), ("cos", cos, (B, N)), ("norms", norms, (B, N, 2))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape or t.device != h.device:
            raise ValueError(f"{name} must have shape {shape} on {h.device}, got {tuple(t.shape)} on {t.device}")
    if not cos.is_contiguous() or not norms.is_contiguous():
        raise ValueError("cos and norms must be contiguous (the forward's outputs)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (tokens per chunk), got {chunk!r}")
    dh = h.new_empty(h.shape) if out is None else out
    _check_out(dh, (B, N, K), h.dtype, h.device, "out")
    dw = torch.zeros((ZD, K), dtype=torch.float32, device=h.device)
    db_all = torch.zeros((ZD,), dtype=torch.float32, device=h.device)
    db = db_all if bias is not None else None
    R = B * N
    if R:
        bias, z = _shipped(h, weight, bias, z)
        chunk = min(triton.cdiv(chunk, BLOCK_T) * BLOCK_T, triton.cdiv(R, BLOCK_T) * BLOCK_T)
        dy = torch.empty((chunk, ZD), dtype=h.dtype, device=h.device)
        prec = _prec(h.dtype)
        for r0 in range(0, R, chunk):
            r1 = min(r0 + chunk, R)
            nb = triton.cdiv(r1 - r0, BLOCK_T)
            _dy_kernel[(nb, triton.cdiv(ZD, BLOCK_Z))](
                    dcos, h, weight, bias, z, cos, norms, dy, r0, r1, N, K, ZD,
                    dcos.stride(0), dcos.stride(1), h.stride(0), h.stride(1), weight.stride(0), z.stride(0),
                    z.stride(1), e, HAS_BIAS=True, BLOCK_T=BLOCK_T, BLOCK_Z=BLOCK_Z, BLOCK_K=BLOCK_K,
                PREC=prec, num_warps=_NUM_WARPS)
            _dh_kernel[(nb, triton.cdiv(K, BLOCK_K))](
                dy, weight, dh, r0, r1, N, K, ZD, weight.stride(0), dh.stride(0), dh.stride(1),
                BLOCK_T=BLOCK_T, BLOCK_Z=BLOCK_Z, BLOCK_K=BLOCK_K, PREC=prec, num_warps=_NUM_WARPS)
            _dw_kernel[(triton.cdiv(ZD, BLOCK_Z), triton.cdiv(K, BLOCK_K))](
                    dy, h, dw, db_all, r0, r1, N, K, ZD, h.stride(0), h.stride(1),
                    HAS_BIAS=True, BLOCK_T=BLOCK_T, BLOCK_Z=BLOCK_Z, BLOCK_K=BLOCK_K, PREC=prec,
                    num_warps=_NUM_WARPS)
    return dh, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels._triton.aot, through effkernels._triton.align)
# ---------------------------------------------------------------------------------------------

def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    specs = []
    opts = {"num_warps": _NUM_WARPS}
    blocks = {"BLOCK_T": BLOCK_T, "BLOCK_Z": BLOCK_Z, "BLOCK_K": BLOCK_K}
    cx_sig = {k: "constexpr" for k in ("HAS_BIAS", "BLOCK_T", "BLOCK_Z", "BLOCK_K", "PREC")}
    for dt, th in _DTYPES.items():
        prec = _prec(dt)
        cx = {"HAS_BIAS": True, **blocks, "PREC": prec}  # no bias ships as a zero bias (_shipped)
        for tz in dict.fromkeys((th, "fp32")):
            ops = {"H": f"*{th}", "W": f"*{th}", "BIAS": f"*{th}", "Z": f"*{tz}"}
            sig = {**ops, "COS": "*fp32", "NRM": "*fp32", **{k: "i32" for k in (
                "R", "N", "K", "ZD", "s_hb", "s_hn", "s_wz", "s_zb", "s_zn")}, "eps": "fp32", **cx_sig}
            specs.append((_fwd_kernel, sig, cx, opts))
            sig = {"DCOS": "*fp32", **ops, "COS": "*fp32", "NRM": "*fp32", "DY": f"*{th}", **{k: "i32" for k in (
                "r0", "R1", "N", "K", "ZD", "s_db", "s_dn", "s_hb", "s_hn", "s_wz", "s_zb", "s_zn")},
                "eps": "fp32", **cx_sig}
            specs.append((_dy_kernel, sig, cx, opts))
        sig = {"DY": f"*{th}", "H": f"*{th}", "DW": "*fp32", "DB": "*fp32", **{k: "i32" for k in (
            "r0", "R1", "N", "K", "ZD", "s_hb", "s_hn")}, **cx_sig}
        specs.append((_dw_kernel, sig, cx, opts))
        sig = {"DY": f"*{th}", "W": f"*{th}", "DH": f"*{th}", **{k: "i32" for k in (
            "r0", "R1", "N", "K", "ZD", "s_wz", "s_ob", "s_on")},
            **{k: "constexpr" for k in ("BLOCK_T", "BLOCK_Z", "BLOCK_K", "PREC")}}
        specs.append((_dh_kernel, sig, {**blocks, "PREC": prec}, opts))
    return specs
