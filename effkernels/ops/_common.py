"""Shared plumbing of the public ops: argument checks and kernel-module lookup."""
from __future__ import annotations

import importlib
import math
import os

import torch

from .. import backends

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int32, torch.int64)


def kernel_module(family: str, backend: str):
    """The module holding `family`'s primitives for a kernel backend (triton, cuda or cpp)."""
    if backend == "triton":
        return importlib.import_module(f"effkernels._triton.{family}")
    if backend in ("cuda", "cpp"):
        return importlib.import_module(f"effkernels._ext.{family}")
    raise ValueError(f"no kernel module for backend {backend!r}")


def pick(op: str, device: torch.device, backend: str | None) -> str:
    return backends.resolve(op, device, backend)


def check_tensor(name: str, t, *, dims: tuple[int, ...] | None = None, floating: bool = False,
                 integer: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if integer and t.dtype not in _INTS:
        raise TypeError(f"{name} must be an int32 or int64 index tensor, got {t.dtype}")


def check_same(names: tuple[str, ...], tensors: tuple, *, dtype: bool = True) -> None:
    """All given tensors on one device (and of one dtype when asked)."""
    first = tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t is None:
            continue
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {names[0]} is on {first.device}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {names[0]} has {first.dtype}")


def check_eps(eps) -> float:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite positive number, got {eps!r}")
    return float(eps)


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    # Kernels take any row strides (adaLN chunks are (B, D) views with row stride 6D) but need
    # unit stride along D for vector loads.
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")


def data_checks_enabled() -> bool:
    """Data-dependent checks (routing index range/duplicates, cu_seqlens offsets) read a tensor on
    the host, once where the caller passes it in, in eager mode; EFFKERNELS_CHECK_INDICES=0 skips them."""
    return os.environ.get("EFFKERNELS_CHECK_INDICES", "1") != "0"
