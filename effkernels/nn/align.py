"""REPA's alignment head: a per-token projector MLP and the alignment loss against a target."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._common import check_backend, check_positive_float, check_positive_int

LOSSES = ("cosine", "smooth_l1", "mse")


class AlignmentHead(nn.Module):
    """Projector Linear(D, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, z_dim) + loss.

    Args:
        dim: width D of the hidden state; z_dim: width of the target features; hidden: projector
            width (REPA: 2048); loss: "cosine" (REPA, negative mean cosine), "smooth_l1" (SRA's
            original, transition at beta) or "mse"; backend: passed to effkernels.ops.
    project(h (B, N, D)) -> (B, N, z_dim).
    forward(h (B, N, D), z (B, N, z_dim)) -> float32 scalar loss; z gets no gradient.
    The layers sit in `self.proj` at indices 0, 2, 4, so REPA's `projectors.i.{0,2,4}.*` map to
    `proj.{0,2,4}.*`. Linears start xavier-uniform with zero bias, as REPA initialises them.
    """

    def __init__(self, dim: int, z_dim: int, hidden: int = 2048, loss: str = "cosine", *,
                 beta: float = 0.05, backend: str | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("z_dim", z_dim), ("hidden", hidden)):
            check_positive_int(name, v)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.dim, self.z_dim, self.loss = dim, z_dim, loss
        self.beta = check_positive_float("beta", beta)
        self.backend = check_backend(backend)
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, z_dim))
        for m in self.proj:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.shape[-1] != self.dim:
            got = getattr(h, "shape", type(h).__name__)
            raise ValueError(f"h must be a tensor with last dim {self.dim}, got {got}")
        return self.proj(h)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z_hat = self.project(h)
        if self.loss == "cosine":
            return ops.cosine_alignment_loss(z_hat, z, backend=self.backend)
        if self.loss == "smooth_l1":
            return ops.smooth_l1_alignment_loss(z_hat, z, self.beta)
        return ops.mse_alignment_loss(z_hat, z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, z_dim={self.z_dim}, loss={self.loss!r}"
