"""Checkpoints: atomic writes, safe loads, and RNG state as plain tensors.

A checkpoint is one torch.save'd dict of tensors and plain Python values only (no pickled objects),
so it loads with `torch.load(weights_only=True)`: loading a checkpoint cannot run code.
Layout:
    step        int, optimizer steps taken
    model       the raw model's state_dict
    ema         the EMA model's state_dict
    optimizer   optimizer.state_dict()
    method      the method's own parts: modules (its trainable modules' state_dict), ema (EMA copies
                of its generator modules, by name), aux ({name: {module, optimizer}}), state
                (its non-module state)
    rng         capture_rng() of every rank, a list indexed by rank
    meta        dict of plain values: model name and kwargs, data spec, value range, sample shape, args
"""
from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not one of ours; the message names the file."""


# -----------------------------------------------------------------------------------------------
# Atomic save, safe load
# -----------------------------------------------------------------------------------------------


def save_checkpoint(state: dict, path: str) -> str:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then os.replace.

    A crash at any point leaves either the old file or the new one at `path`, never a torn one
    (os.replace is atomic within a filesystem, hence the temp file beside the target).
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load(weights_only=True) with errors that name the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(ckpt, dict) or "step" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path!r} is not an effkernels checkpoint (no 'step'/'model' entries)")
    return ckpt


# -----------------------------------------------------------------------------------------------
# RNG state as tensors
# -----------------------------------------------------------------------------------------------


def capture_rng() -> dict:
    """torch (CPU and every CUDA device), numpy and Python RNG states, all as tensors."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(py_state), dtype=torch.int64),
        "python_meta": torch.tensor([py_version, py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict) -> None:
    """Inverse of capture_rng."""
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    pv, has_g, g = state["python_meta"].tolist()
    random.setstate((int(pv), tuple(int(v) for v in state["python"].tolist()), g if has_g else None))
    pos, has_gauss, gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"].cpu()
        if cuda.shape[0] == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(list(cuda))


def latest_checkpoint(folder: str) -> str | None:
    """<folder>/last.pt if it exists (the trainer keeps the newest there)."""
    p = os.path.join(folder, "last.pt")
    return p if os.path.isfile(p) else None
