"""Triton flash-attention over the packed (varlen) form: forward and backward, no causal mask.

Primitives (contract in effkernels/ops/attention.py):
  varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, out=None, lse=None) -> (out, lse)
  varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq=None, dk=None, dv=None)
      -> (dq, dk, dv)
q, k, v, dout: (T, H, Dh), any row and head strides, unit stride along Dh (the views that
qkv(x).reshape(T, 3, H, Dh).unbind(1) gives). out, dq, dk, dv: (T, H, Dh) with unit last stride,
contiguous when the launcher makes them. lse: float32 (H, T), natural-log log-sum-exp of each row's
scaled scores. cu_seqlens: (S + 1,) offsets (trusted here; ops checks their values once in eager
mode), max_seqlen: an int >= every segment's length (sizes the grid, so no host sync).

Layout: grid (cdiv(max_seqlen, BLOCK), S, H); program (i, s, h) owns rows (or, for dk/dv, keys)
i * BLOCK .. of segment s and head h, and exits at once when the segment is shorter. Attention never
crosses a segment because every loop runs over the segment's own rows only.
  forward: one pass over the segment's key blocks with the online softmax (running max and sum in
    float32, scores kept in the base-2 domain so exp2 is used), fp32 accumulator, lse saved.
  backward: delta = rowsum(dO * O) (its own small kernel), then a dk/dv kernel per key block that
    loops over the segment's query blocks, and a dq kernel per query block that loops over its key
    blocks. Each gradient row is written by exactly one program: no atomics, so the backward is
    bit-for-bit deterministic, at the price of computing the scores twice.
Dh need not be a power of two: BLOCK_D is the next power of two >= max(Dh, 16) (tl.dot needs 16),
with masked loads and stores along it (DiT-XL's Dh = 72 runs in a 128-wide block).

Dtypes: fp32, fp16, bf16. Softmax statistics, the score tile and every accumulator are float32.
The matmuls take fp16/bf16 operands as they are (tensor cores, float32 accumulation; p and ds are
cast to the input dtype for their matmul, as flash-attention does) and fp32 operands with
input_precision="tf32x3" (three TF32 products per fp32 one: ~fp32 accuracy on tensor cores; "ieee"
fp32 dots compile to FMA loops that took ptxas 1-3 minutes per kernel here and, at Dh 128, needed
more shared memory than an A100 has). Under Triton's CPU
interpreter a bf16 tl.dot returns garbage and bf16 arithmetic is wrong, so there bf16 operands are
upcast to float32 first and bf16 stores round by hand (adaln._cast).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .adaln import _cast

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_INTERPRETER: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
_LOG2E = 1.4426950408889634

# (fp32 inputs?, BLOCK_D) -> (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages), one
# tile shape for all three attention kernels of a configuration.
# 64 x 64 for 16-bit inputs: the segments this op sees are short (a sample's kept tokens, ~64..256
# at 256 tokens per image), so a 128-row block would leave up to half a block of padded rows per
# segment, and a 64 x 64 fp32 score tile is 32 registers per thread at 4 warps. At Dh 128 the dk/dv
# kernel keeps k, v, dk and dv (4 tiles of 64 x 128) live, hence 8 warps. fp32 tiles take twice the
# shared memory per stage (and 3xTF32 splits each operand in two): at 64 x 64 x 128 and 3 stages
# the kernels asked for 200-330 KB where an A100 has 163 KB, so fp32 uses 2 stages, and 32 x 32
# tiles at Dh 128 (measured with the AOT compile's metadata, tests/test_attention_triton.py).
# Dh above 128 is not covered (DiT/SiT heads are 64, XL's 72; flash-attn serves larger ones).
# The same shapes run under the interpreter, so the CPU tests exercise multi-block segments.
_TILES = {
    (False, 16): (64, 64, 4, 3), (False, 32): (64, 64, 4, 3), (False, 64): (64, 64, 4, 3),
    (False, 128): (64, 64, 8, 3),
    (True, 16): (64, 64, 4, 2), (True, 32): (64, 64, 4, 2), (True, 64): (64, 64, 4, 2),
    (True, 128): (32, 32, 4, 2),
}
_MAX_HEAD_DIM = 128
# The delta kernel is a row reduction: BLOCK_R rows x BLOCK_D per program.
_DELTA_ROWS = 64
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dims 1 and 2 (segments, heads)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

# Under the interpreter every call of a @triton.jit helper costs ~10 ms (it re-patches triton.language),
# so the kernels below inline their tile arithmetic and call _cast only where a bf16 store needs it.

@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, T, D, qk_scale,
                s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seg = tl.program_id(1)
    start = tl.load(CU + seg).to(tl.int64)
    L = tl.load(CU + seg + 1) - tl.load(CU + seg)
    if tl.program_id(0) * BLOCK_M >= L:
        return
    h = tl.program_id(2).to(tl.int64)
    # The tl.dot operand dtype: the inputs' own, except bf16 under the interpreter, whose bf16
    # tl.dot returns garbage (fp32 there). fp32 operands run as 3xTF32 (module docstring);
    # fp16/bf16 operands ignore input_precision.
    OP = Q.dtype.element_ty
    if _INTERPRETER:
        if OP == tl.bfloat16:
            OP = tl.float32
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m = start + offs_m.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    mmask = offs_m < L
    qmask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + rows_m[:, None] * s_qt + h * s_qh + cols[None, :], mask=qmask, other=0).to(OP)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max, base-2 domain
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows_n = start + offs_n.to(tl.int64)
        nmask = offs_n < L
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + rows_n[:, None] * s_kt + h * s_kh + cols[None, :], mask=kvmask, other=0).to(OP)
        v = tl.load(V + rows_n[:, None] * s_vt + h * s_vh + cols[None, :], mask=kvmask, other=0).to(OP)
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * qk_scale  # (BLOCK_M, BLOCK_N), log2(e) folded in
        s = tl.where(nmask[None, :], s, float("-inf"))
        # Every block holds at least one real key (n0 < L), so m_new is finite and no inf - inf appears.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(OP), v, input_precision="tf32x3")
        m_i = m_new
    # Padded rows (q = 0) saw real keys only, so l_i > 0 on every row and nothing divides by 0.
    acc = acc / l_i[:, None]
    o = acc.to(O.dtype.element_ty)
    if _INTERPRETER:
        if O.dtype.element_ty == tl.bfloat16:
            o = _cast(acc, tl.bfloat16)
    tl.store(O + rows_m[:, None] * s_ot + h * s_oh + cols[None, :], o, mask=qmask)
    tl.store(LSE + h * T + rows_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mmask)  # natural log


@triton.jit
def _delta_kernel(O, DO, DELTA, T, D, s_ot, s_oh, s_dt, s_dh,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in float32 (the softmax backward's row term)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    o = tl.load(O + rows[:, None] * s_ot + h * s_oh + cols[None, :], mask=mask, other=0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * s_dt + h * s_dh + cols[None, :], mask=mask, other=0).to(tl.float32)
    tl.store(DELTA + h * T + rows, tl.sum(o * do, axis=1), mask=rows < T)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, T, D, qk_scale, sm_scale,
                     s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dkt, s_dkh, s_dvt, s_dvh,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (j, s, h): keys j * BLOCK_N .. of segment s; loops over all of the segment's queries.
    seg = tl.program_id(1)
    start = tl.load(CU + seg).to(tl.int64)
    L = tl.load(CU + seg + 1) - tl.load(CU + seg)
    if tl.program_id(0) * BLOCK_N >= L:
        return
    h = tl.program_id(2).to(tl.int64)
    OP = Q.dtype.element_ty
    if _INTERPRETER:
        if OP == tl.bfloat16:
            OP = tl.float32
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = start + offs_n.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    nmask = offs_n < L
    kvmask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + rows_n[:, None] * s_kt + h * s_kh + cols[None, :], mask=kvmask, other=0).to(OP)
    v = tl.load(V + rows_n[:, None] * s_vt + h * s_vh + cols[None, :], mask=kvmask, other=0).to(OP)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, L, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows_m = start + offs_m.to(tl.int64)
        mmask = offs_m < L
        qmask = mmask[:, None] & dmask[None, :]
        q = tl.load(Q + rows_m[:, None] * s_qt + h * s_qh + cols[None, :], mask=qmask, other=0).to(OP)
        do = tl.load(DO + rows_m[:, None] * s_dot + h * s_doh + cols[None, :], mask=qmask, other=0).to(OP)
        lse = tl.load(LSE + h * T + rows_m, mask=mmask, other=0) * 1.4426950408889634
        delta = tl.load(DELTA + h * T + rows_m, mask=mmask, other=0)
        # Transposed scores (keys x queries), so dv and dk accumulate without transposing p or ds.
        st = tl.dot(k, tl.trans(q), input_precision="tf32x3") * qk_scale
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(nmask[:, None] & mmask[None, :], pt, 0.0)
        dv += tl.dot(pt.to(OP), do, input_precision="tf32x3")
        dpt = tl.dot(v, tl.trans(do), input_precision="tf32x3")
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(OP), q, input_precision="tf32x3")
    dk = dk * sm_scale
    dk_out = dk.to(DK.dtype.element_ty)
    dv_out = dv.to(DV.dtype.element_ty)
    if _INTERPRETER:
        if DK.dtype.element_ty == tl.bfloat16:
            dk_out = _cast(dk, tl.bfloat16)
            dv_out = _cast(dv, tl.bfloat16)
    tl.store(DK + rows_n[:, None] * s_dkt + h * s_dkh + cols[None, :], dk_out, mask=kvmask)
    tl.store(DV + rows_n[:, None] * s_dvt + h * s_dvh + cols[None, :], dv_out, mask=kvmask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, T, D, qk_scale, sm_scale,
                   s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_dot, s_doh, s_dqt, s_dqh,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, s, h): queries i * BLOCK_M .. of segment s; loops over all of the segment's keys.
    seg = tl.program_id(1)
    start = tl.load(CU + seg).to(tl.int64)
    L = tl.load(CU + seg + 1) - tl.load(CU + seg)
    if tl.program_id(0) * BLOCK_M >= L:
        return
    h = tl.program_id(2).to(tl.int64)
    OP = Q.dtype.element_ty
    if _INTERPRETER:
        if OP == tl.bfloat16:
            OP = tl.float32
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_m = start + offs_m.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    mmask = offs_m < L
    qmask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + rows_m[:, None] * s_qt + h * s_qh + cols[None, :], mask=qmask, other=0).to(OP)
    do = tl.load(DO + rows_m[:, None] * s_dot + h * s_doh + cols[None, :], mask=qmask, other=0).to(OP)
    lse = tl.load(LSE + h * T + rows_m, mask=mmask, other=0) * 1.4426950408889634
    delta = tl.load(DELTA + h * T + rows_m, mask=mmask, other=0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows_n = start + offs_n.to(tl.int64)
        nmask = offs_n < L
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + rows_n[:, None] * s_kt + h * s_kh + cols[None, :], mask=kvmask, other=0).to(OP)
        v = tl.load(V + rows_n[:, None] * s_vt + h * s_vh + cols[None, :], mask=kvmask, other=0).to(OP)
        s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mmask[:, None] & nmask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="tf32x3")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(OP), k, input_precision="tf32x3")
    dq = dq * sm_scale
    dq_out = dq.to(DQ.dtype.element_ty)
    if _INTERPRETER:
        if DQ.dtype.element_ty == tl.bfloat16:
            dq_out = _cast(dq, tl.bfloat16)
    tl.store(DQ + rows_m[:, None] * s_dqt + h * s_dqh + cols[None, :], dq_out, mask=qmask)


# ---------------------------------------------------------------------------------------------
# Launchers (the primitives of effkernels/ops/attention.py)
# ---------------------------------------------------------------------------------------------

def _tiles(dh: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_D, BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim dh and the inputs' dtype."""
    if dh < 1 or dh > _MAX_HEAD_DIM:
        raise ValueError(f"q's head dim Dh={dh} is outside the triton backend's range 1..{_MAX_HEAD_DIM}")
    blk = max(16, triton.next_power_of_2(dh))
    return (blk, *_TILES[(dtype == torch.float32, blk)])


def _check_rows(name: str, t, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """A (T, H, Dh) tensor of q's dtype and device, unit stride along Dh."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype or t.device != device:
        raise TypeError(f"{name} must be {dtype} on {device}, got {t.dtype} on {t.device}")
    if shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a (T, H, Dh) tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q: the triton backend supports float32, float16 and bfloat16, got {q.dtype}")
    shape = tuple(q.shape)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rows(name, t, shape, q.dtype, q.device)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of S + 1 >= 2 offsets, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if cu_seqlens.shape[0] - 1 > _MAX_GRID_YZ or shape[1] > _MAX_GRID_YZ:
        raise ValueError(f"the triton backend takes at most {_MAX_GRID_YZ} segments and heads, got "
                         f"S={cu_seqlens.shape[0] - 1}, H={shape[1]}")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    return _tiles(shape[2], q.dtype)


def _out(name, t, like):
    if t is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    _check_rows(name, t, tuple(like.shape), like.dtype, like.device)
    return t


def _check_lse(name, t, H, T, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (H, T) or t.dtype != torch.float32 \
            or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 ({H}, {T}) tensor on {device}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def _rs(t):
    return t.stride(0), t.stride(1)


def varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale, out=None, lse=None):
    """(softmax(q k^T * scale) v per segment and head (T, H, Dh), lse float32 (H, T))."""
    blk, bm, bn, warps, stages = _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale)
    T, H, Dh = q.shape
    out = _out("out", out, q)
    if lse is None:
        lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    _check_lse("lse", lse, H, T, q.device)
    if T == 0:
        return out, lse
    cu = cu_seqlens.to(torch.int32)  # one kernel variant; T < 2**31 rows
    grid = (triton.cdiv(max_seqlen, bm), cu.shape[0] - 1, H)
    _fwd_kernel[grid](q, k, v, out, lse, cu, T, Dh, float(scale) * _LOG2E,
                      *_rs(q), *_rs(k), *_rs(v), *_rs(out),
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=blk, num_warps=warps, num_stages=stages)
    return out, lse


def varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, dq=None, dk=None, dv=None):
    """(dq, dk, dv) of varlen_fwd, given its out and lse; each (T, H, Dh) in q's dtype."""
    blk, bm, bn, warps, stages = _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale)
    T, H, Dh = q.shape
    _check_rows("dout", dout, tuple(q.shape), q.dtype, q.device)
    _check_rows("out", out, tuple(q.shape), q.dtype, q.device)
    _check_lse("lse", lse, H, T, q.device)
    dq, dk, dv = _out("dq", dq, q), _out("dk", dk, q), _out("dv", dv, q)
    if T == 0:
        return dq, dk, dv
    cu = cu_seqlens.to(torch.int32)
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(T, _DELTA_ROWS), H)](out, dout, delta, T, Dh, *_rs(out), *_rs(dout),
                                                    BLOCK_R=_DELTA_ROWS, BLOCK_D=blk, num_warps=4)
    S = cu.shape[0] - 1
    scales = (float(scale) * _LOG2E, float(scale))
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, bn), S, H)](
        q, k, v, dout, lse, delta, dk, dv, cu, T, Dh, *scales,
        *_rs(q), *_rs(k), *_rs(v), *_rs(dout), *_rs(dk), *_rs(dv),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=blk, num_warps=warps, num_stages=stages)
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, bm), S, H)](
        q, k, v, dout, lse, delta, dq, cu, T, Dh, *scales,
        *_rs(q), *_rs(k), *_rs(v), *_rs(dout), *_rs(dq),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=blk, num_warps=warps, num_stages=stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels/_triton/aot.py)
# ---------------------------------------------------------------------------------------------

_F32_PTRS = ("LSE", "DELTA")
_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_R")


def _signature(fn, dt: str) -> dict:
    """Kernel arguments by naming convention: upper case = pointer (CU int32, LSE/DELTA float32,
    else the inputs' dtype), *_scale = fp32, T, D and the strides s_* = i32."""
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name.endswith("scale"):
            sig[name] = "fp32"
        elif name in ("T", "D") or not name.isupper():
            sig[name] = "i32"
        else:
            sig[name] = "*i32" if name == "CU" else "*fp32" if name in _F32_PTRS else f"*{dt}"
    return sig


def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    specs = []
    for dt in _DTYPES.values():
        for (f32, blk), (bm, bn, warps, stages) in _TILES.items():
            if f32 != (dt == "fp32"):
                continue
            tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": blk}
            for fn in (_fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel):
                specs.append((fn, _signature(fn, dt), tile, {"num_warps": warps, "num_stages": stages}))
            specs.append((_delta_kernel, _signature(_delta_kernel, dt),
                          {"BLOCK_R": _DELTA_ROWS, "BLOCK_D": blk}, {"num_warps": 4}))
    return specs
