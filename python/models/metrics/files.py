"""Reading a feature network's file: what the classifier's and Inception's loaders share."""
from __future__ import annotations

import os
import warnings

import torch


def check_file(path: str, what: str, hint: str = "") -> None:
    """FileNotFoundError naming `what` when `path` is not a file (nothing is ever downloaded)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist{hint}")


def load_torchscript(path: str) -> torch.jit.ScriptModule:
    """A TorchScript archive on the CPU. TorchScript is deprecated in torch but is how common FID
    Inception weights ship (the ADM/clean-fid inception-2015-12-05.pt), so it stays supported;
    torch's deprecation warning is silenced. Errors are torch's (the callers name the file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu")
