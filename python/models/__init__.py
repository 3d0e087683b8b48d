"""The thin model layer: backbone, objectives, samplers, data, metrics, methods, trainer.

The backbone and interop names are reachable here:
    from effkernels.models import build, DiT, Route, load_official, apply_effkernels
the rest by module (`effkernels.models.train`, `effkernels.models.samplers`, ...).
"""
from .backbone import CONFIGS, DiT, Route, build
from .convert import apply_effkernels, load_official, revert_effkernels

__all__ = ["DiT", "Route", "build", "CONFIGS", "load_official", "apply_effkernels", "revert_effkernels"]
