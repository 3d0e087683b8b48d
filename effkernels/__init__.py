"""effkernels: fused Triton and CUDA kernels, and a thin model layer, for training DiT/SiT fast.

The kernel layer: `effkernels.ops` (functional ops), `effkernels.nn` (drop-in modules), `effkernels.reference`
(the specification), `effkernels.backends`. The model layer is `effkernels.models` (import it by name);
this package never imports it.
"""
__version__ = "0.1.0"

from . import backends, nn, ops, reference  # noqa: E402
from .backends import use_backend  # noqa: E402

__all__ = ["backends", "nn", "ops", "reference", "use_backend", "__version__"]
