"""Pure-PyTorch references of every op: the specification the kernels are tested against."""
from . import adaln, align, attention, jvp, rmsnorm, rope, routing, swiglu

__all__ = ["adaln", "align", "attention", "jvp", "rmsnorm", "rope", "routing", "swiglu"]
