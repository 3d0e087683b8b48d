"""The cache folder of fitted networks and derived files (EFFKERNELS_CACHE, default ~/.cache/effkernels)."""
from __future__ import annotations

import os


def cache_dir() -> str:
    return os.environ.get("EFFKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "effkernels"))
