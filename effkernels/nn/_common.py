"""Constructor-argument checks shared by the effkernels.nn modules."""
from __future__ import annotations

import math

import torch

from ..backends import BACKENDS


def unit_last(t):
    """t itself when its last dim has unit stride (strided rows are fine), else a contiguous copy.

    The ops need unit stride along D for vector loads; torch.nn modules accept any layout, so the
    drop-in modules copy only the rare tensors that would otherwise be rejected (e.g. the
    channels-last result of a patch embedding's transpose).
    """
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def check_backend(backend) -> str | None:
    # Checked at construction so that a typo fails where the module is built, not at the first step.
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def check_positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def check_positive_float(name: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    return float(v)


def check_ratio(name: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < 1):
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    return float(v)
