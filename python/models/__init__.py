"""The thin model layer: backbone, objectives, samplers, data, metrics, trainer.

Submodules import on first use (`effkernels.models.backbone`, ...), so `import effkernels` stays
light. The backbone and interop names are also reachable here:
    from effkernels.models import build, DiT, Route, load_official, apply_effkernels
"""
import importlib

_NAMES = {
    "DiT": "backbone", "Route": "backbone", "build": "backbone", "CONFIGS": "backbone",
    "load_official": "convert", "apply_effkernels": "convert", "revert_effkernels": "convert",
}


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = list(_NAMES)
