"""Triton kernels for token routing: gather the rows a route keeps, scatter rows back.

Primitives (contract in effkernels/ops/routing.py):
  gather(x, idx, out=None)                       (B, N, D), (B, K) -> (B, K, D)
  scatter(x, x_sub, idx, num_tokens, out=None)   -> (B, N, D); x None = zeros, x_sub None = zero rows

Both are pure data movement, so values are loaded and stored in their own dtype: no arithmetic
touches them, which keeps the copy bit-exact and is also what Triton's CPU interpreter needs for bf16.
Every kernel runs on a 2-D grid (row blocks, D-blocks); the tile shape comes from a short fixed
list so that `aot_specs()` can enumerate every configuration a launcher can pick.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_D, BLOCK_R, num_warps) the launchers can pick: a tile of BLOCK_R rows x BLOCK_D columns
# (~1024 elements) per program, so that narrow rows share a program instead of each paying a launch
# slot, and wide rows get more warps to keep enough loads in flight.
_BLOCKS = ((32, 32, 1), (128, 8, 1), (512, 2, 2), (1024, 1, 4))
_BLOCK_K = 128  # indices per program of the inverse-map kernel
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_IDX_DTYPES = {torch.int32: "i32", torch.int64: "i64"}


@triton.jit
def _gather_kernel(X, IDX, OUT, R, N, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows of OUT in [0, R = B*K); int64 so that B*N*D may pass 2**31
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < D)[None, :]
    src = tl.load(IDX + rows, mask=rmask, other=0).to(tl.int64)
    src_row = (rows // K) * N + src
    vals = tl.load(X + (src_row * D)[:, None] + cols[None, :], mask=mask)
    tl.store(OUT + (rows * D)[:, None] + cols[None, :], vals, mask=mask)


@triton.jit
def _inverse_kernel(IDX, INV, N, K, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = k < K
    n = tl.load(IDX + b * K + k, mask=mask, other=0).to(tl.int64)
    tl.store(INV + b * N + n, k.to(tl.int32), mask=mask)


@triton.jit
def _scatter_kernel(X, SUB, INV, OUT, R, N, K, D, HAS_X: tl.constexpr, HAS_SUB: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows of OUT, R = B*N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    mask = rmask[:, None] & (cols < D)[None, :]
    j = tl.load(INV + rows, mask=rmask, other=-1)  # position k in x_sub that lands here, or -1
    routed = (j >= 0)[:, None]
    out_ptrs = OUT + (rows * D)[:, None] + cols[None, :]
    # Masked-off lanes issue no memory traffic, so each row reads exactly one source. The clamp
    # keeps even the never-dereferenced address of an unrouted row inside x_sub.
    sub_row = (rows // N) * K + tl.maximum(j, 0).to(tl.int64)
    if HAS_SUB:
        from_sub = tl.load(SUB + (sub_row * D)[:, None] + cols[None, :], mask=mask & routed, other=0)
    if HAS_X:
        from_x = tl.load(X + (rows * D)[:, None] + cols[None, :], mask=mask & (j < 0)[:, None], other=0)
    if HAS_SUB and HAS_X:
        vals = tl.where(routed, from_sub, from_x)
    elif HAS_SUB:
        vals = from_sub  # other=0 already zeroed the unrouted rows
    else:
        vals = from_x  # other=0 already zeroed the routed rows
    tl.store(out_ptrs, vals.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _block_d(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, num_warps) for rows of d elements: the smallest listed block that holds a
    row; past the largest, whichever of the two largest pads the row least (D=1152: 3x512, not 2x1024)."""
    for cfg in _BLOCKS:
        if d <= cfg[0]:
            return cfg
    return min(reversed(_BLOCKS[-2:]), key=lambda cfg: triton.cdiv(d, cfg[0]) * cfg[0])


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the triton backend, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _check_idx(idx: torch.Tensor) -> None:
    if idx.dtype not in _IDX_DTYPES:
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 2 or not idx.is_contiguous():
        raise ValueError(f"idx must be a contiguous (B, K) tensor, got shape {tuple(idx.shape)}, "
                         f"strides {idx.stride()}")


def _check_out(out: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be a {like.dtype} tensor of shape {shape} on {like.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")


def gather(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, k] = x[b, idx[b, k]]: (B, N, D), (B, K) -> (B, K, D). Indices are trusted (ops checks)."""
    _check_float("x", x)
    _check_idx(idx)
    if x.dim() != 3 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"x must be (B, N, D) with idx's batch {idx.shape[0]}, got {tuple(x.shape)}")
    B, N, D = x.shape
    K = idx.shape[1]
    shape = (B, K, D)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _check_out(out, shape, x)
    if out.numel() == 0:
        return out
    blk, rows, warps = _block_d(D)
    _gather_kernel[(triton.cdiv(B * K, rows), triton.cdiv(D, blk))](
        x, idx, out, B * K, N, K, D, BLOCK_R=rows, BLOCK_D=blk, num_warps=warps)
    return out


def inverse_map(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """inv[b, n] = k where idx[b, k] == n, else -1, as int32 on idx's device: (B, K) -> (B, N)."""
    _check_idx(idx)
    B, K = idx.shape
    inv = torch.full((B, num_tokens), -1, dtype=torch.int32, device=idx.device)
    if B * K:
        _inverse_kernel[(B, triton.cdiv(K, _BLOCK_K))](idx, inv, num_tokens, K, BLOCK_K=_BLOCK_K,
                                                        num_warps=1)
    return inv


def scatter(x: torch.Tensor | None, x_sub: torch.Tensor | None, idx: torch.Tensor, num_tokens: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Out of place: out = x (zeros if None), then out[b, idx[b, k]] = x_sub[b, k] (zeros if None).

    Why an inverse map rather than copy-then-overwrite: with inv (B, N) built on the device, every
    output row is read from exactly one source (its x row or its x_sub row) and written once. Copy +
    overwrite reads and writes the K routed rows twice and needs two ordered row passes; the map
    costs 4 bytes per token, small next to a row of D values. When x is None (gather's backward)
    unrouted rows are written as zeros without being read from anywhere.
    """
    if x is None and x_sub is None:
        raise ValueError("scatter needs x or x_sub; both are None")
    _check_idx(idx)
    if not isinstance(num_tokens, int) or num_tokens < idx.shape[1]:
        raise ValueError(f"num_tokens must be an int >= K={idx.shape[1]}, got {num_tokens!r}")
    B, K = idx.shape
    like = x if x is not None else x_sub
    for name, t, want_n in (("x", x, num_tokens), ("x_sub", x_sub, K)):
        if t is None:
            continue
        _check_float(name, t)
        if t.dim() != 3 or t.shape[0] != B or t.shape[1] != want_n or t.shape[2] != like.shape[2]:
            raise ValueError(f"{name} must have shape {(B, want_n, like.shape[2])}, got {tuple(t.shape)}")
        if t.dtype != like.dtype or t.device != like.device:
            raise TypeError(f"{name} must match {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    D = like.shape[2]
    shape = (B, num_tokens, D)
    if out is None:
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
    _check_out(out, shape, like)
    if out.numel() == 0:
        return out
    inv = inverse_map(idx, num_tokens)
    blk, rows, warps = _block_d(D)
    # A constexpr-disabled pointer is never read; `out` stands in so the launch has a real tensor.
    _scatter_kernel[(triton.cdiv(B * num_tokens, rows), triton.cdiv(D, blk))](
        out if x is None else x, out if x_sub is None else x_sub, inv, out, B * num_tokens, num_tokens,
        K, D, HAS_X=x is not None, HAS_SUB=x_sub is not None, BLOCK_R=rows, BLOCK_D=blk, num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (effkernels._triton.aot)
# ---------------------------------------------------------------------------------------------

def aot_specs():
    """Every (kernel, signature, constexprs, options) the launchers above can launch."""
    specs = []
    for it in _IDX_DTYPES.values():
        specs.append((_inverse_kernel, {"IDX": f"*{it}", "INV": "*i32", "N": "i32", "K": "i32",
                                        "BLOCK_K": "constexpr"}, {"BLOCK_K": _BLOCK_K}, {"num_warps": 1}))
    for ft in _DTYPES.values():
        for blk, rows, warps in _BLOCKS:
            opts = {"num_warps": warps}
            tile = {"BLOCK_R": rows, "BLOCK_D": blk}
            for it in _IDX_DTYPES.values():
                sig = {"X": f"*{ft}", "IDX": f"*{it}", "OUT": f"*{ft}", "R": "i32", "N": "i32", "K": "i32",
                       "D": "i32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
                specs.append((_gather_kernel, sig, tile, opts))
            for has_x, has_sub in ((True, True), (True, False), (False, True)):
                sig = {"X": f"*{ft}", "SUB": f"*{ft}", "INV": "*i32", "OUT": f"*{ft}", "R": "i32", "N": "i32",
                       "K": "i32", "D": "i32", "HAS_X": "constexpr", "HAS_SUB": "constexpr",
                       "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
                specs.append((_scatter_kernel, sig, {"HAS_X": has_x, "HAS_SUB": has_sub, **tile}, opts))
    return specs
