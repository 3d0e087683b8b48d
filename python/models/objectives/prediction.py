"""What a network's output means: the mean half of a learned-sigma output, the tensor of a (out, extras)
tuple, and whether a network predicts DDPM noise or a velocity."""
from __future__ import annotations

import torch


def mean_prediction(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The prediction shaped like `like` (B, C, ...): `out` itself, or its first C channels when the
    model also predicts a variance (DiT's learn_sigma: 2C channels, mean first, as DiT and SiT split
    them). Any other shape is an error: broadcasting a wrong shape would train on a wrong target."""
    if out.shape == like.shape:
        return out
    c = like.shape[1] if like.dim() > 1 else None
    if c is not None and out.dim() == like.dim() and out.shape[1] == 2 * c and out.shape[2:] == like.shape[2:] \
            and out.shape[0] == like.shape[0]:
        return out[:, :c]
    raise ValueError(f"the model's output {tuple(out.shape)} matches neither the target {tuple(like.shape)} "
                     "nor a learned-sigma output (B, 2C, ...)")


def model_output(out):
    return out[0] if isinstance(out, tuple) else out


def predicts_noise(model) -> bool:
    """Whether the network predicts DDPM noise (an official DiT checkpoint), not a velocity."""
    return getattr(getattr(model, "interop", None), "prediction", "velocity") == "eps"
