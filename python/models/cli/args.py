"""Argument checks shared by the command-line tools (effkernels-train, effkernels-sample)."""
from __future__ import annotations

import argparse

import torch

from effkernels.backends import available


def check_backend_arg(p: argparse.ArgumentParser, backend: str, device: str) -> None:
    """A named backend that cannot run on this device is an argument error now, not a failure mid-run."""
    if backend != "auto":
        ok, why = available(backend, torch.device(device))
        if not ok:
            p.error(f"--backend {backend} cannot run on {device} here: {why}")
