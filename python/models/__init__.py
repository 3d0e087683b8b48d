"""The thin model layer: backbone, objectives, samplers, data, metrics, methods, trainer.

The backbone and interop names are reachable here:
    from effkernels.models import build, DiT, Route, load_official, apply_effkernels
the rest by module (`effkernels.models.train`, `effkernels.models.sampling.samplers`, ...).
"""
from .backbone.configs import CONFIGS, build
from .backbone.network import DiT, Route
from .interop.patch import apply_effkernels, revert_effkernels
from .interop.official import load_official

__all__ = ["DiT", "Route", "build", "CONFIGS", "load_official", "apply_effkernels", "revert_effkernels"]
