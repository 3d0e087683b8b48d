"""effkernels: fused Triton and CUDA kernels, and a thin model layer, for training DiT/SiT fast."""
__version__ = "0.1.0"

from . import backends, ops, reference  # noqa: E402
from .backends import use_backend  # noqa: E402

__all__ = ["backends", "ops", "reference", "use_backend", "__version__"]


def __getattr__(name):
    # The model layer imports the nn stack; load it only when asked for.
    if name in ("apply_effkernels", "revert_effkernels"):
        from .models import convert
        return getattr(convert, name)
    if name in ("models", "nn"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'effkernels' has no attribute {name!r}")
