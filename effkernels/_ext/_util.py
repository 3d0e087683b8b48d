"""Checks shared by the effkernels._ext wrappers (the `out=` buffers a caller passes)."""
from __future__ import annotations

import torch


def check_out(out, shape, dtype, device, name: str = "out") -> None:
    """out= must be a contiguous tensor of the result's shape, dtype and device: the kernel writes into it."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{name} must be on {device}, got {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {out.stride()}")
