"""The cache of fitted networks (EFFKERNELS_CACHE, default ~/.cache/effkernels): the metric's classifier,
REPA's data-trained encoder."""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable

import torch
from torch import nn

from .checkpoint import save_checkpoint


def cache_dir() -> str:
    return os.environ.get("EFFKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "effkernels"))


def load_or_fit(path: str, build: Callable[..., nn.Module], fit: Callable[[], tuple[nn.Module, dict]], *,
                retrain: bool = False, what: str = "cached network") -> tuple[nn.Module, dict, bool]:
    """(net, info, loaded): the network saved at `path` ({"config", "state", "info"}, a weights-only
    checkpoint; `build(**config)` makes the module to load into), or `fit()` -> (net with a `.config`
    dict, info) saved there. An unreadable file is refitted, saying so. Building the module to load
    into leaves the caller's RNG as it was, so a run that loads and one that fits go on alike.
    fit() runs with one torch CPU thread whatever the caller's: float sums split over threads round
    differently, so a network fitted with 2 threads differs from one fitted with 1 (and every FD
    measured with it); with one thread the fitted weights are the same on every machine and run."""
    if os.path.isfile(path) and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            with torch.random.fork_rng():  # its init is overwritten
                net = build(**blob["config"])
            net.load_state_dict(blob["state"])
            return net, dict(blob["info"]), True
        except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as e:
            print(f"{what} {path!r} unreadable ({type(e).__name__}); refitting")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, info = fit()
    finally:
        torch.set_num_threads(threads)
    save_checkpoint({"config": net.config, "state": net.state_dict(), "info": info}, path)
    return net, info, False
