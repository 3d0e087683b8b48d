"""What every reference shares."""
import torch


def _up(t: torch.Tensor) -> torch.Tensor:
    """float32 math for 16/32-bit inputs; float64 stays float64 (so the reference can be gradchecked)."""
    return t if t.dtype == torch.float64 else t.float()
