"""Pure-PyTorch references of every op: the specification the kernels are tested against."""
from . import adaln, align, attention, jvp, rmsnorm, routing

__all__ = ["adaln", "align", "attention", "jvp", "rmsnorm", "routing"]
