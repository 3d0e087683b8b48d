"""effkernels: fused Triton and CUDA kernels, and a thin model layer, for training DiT/SiT fast."""
__version__ = "0.1.0"

from . import backends, ops, reference  # noqa: E402
from .backends import use_backend  # noqa: E402

__all__ = ["backends", "ops", "reference", "use_backend", "__version__"]
