"""REPA's alignment head: a per-token projector MLP and the alignment loss against a target."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._common import check_backend, check_positive_float, check_positive_int

LOSSES = ("cosine", "smooth_l1", "mse")

# Whether the cosine loss runs with the last Linear fused in (ops.projected_cosine_loss) when the
# head is built with fused=None, per device type of h. Set from bench/bench_align.py (docs/results.md).
FUSED_DEFAULT = {"cpu": False, "cuda": False}


class AlignmentHead(nn.Module):
    """Projector Linear(D, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, z_dim) + loss.

    Args:
        dim: width D of the hidden state; z_dim: width of the target features; hidden: projector
            width (REPA: 2048); loss: "cosine" (REPA, negative mean cosine), "smooth_l1" (SRA's
            original, transition at beta) or "mse", both means over all elements (tokens and
            features, as F.smooth_l1_loss / F.mse_loss); backend: passed to effkernels.ops.
        fused: for the cosine loss, compute the last Linear inside the loss
            (ops.projected_cosine_loss: the (B, N, z_dim) projection is never materialised whole)
            instead of project() then ops.cosine_alignment_loss; None: FUSED_DEFAULT for h's device.
    project(h (B, N, D)) -> (B, N, z_dim).
    forward(h (B, N, D), z (B, N, z_dim), fused=None, token_weight=None) -> float32 scalar loss;
        z gets no gradient; fused= overrides the module's choice for this call; token_weight (B, N):
        the weighted sum of the per-token losses instead of their mean (see effkernels.ops.align).
    The layers sit in `self.proj` at indices 0, 2, 4, so REPA's `projectors.i.{0,2,4}.*` map to
    `proj.{0,2,4}.*`. Linears start xavier-uniform with zero bias, as REPA initialises them.
    """

    def __init__(self, dim: int, z_dim: int, hidden: int = 2048, loss: str = "cosine", *,
                 beta: float = 0.05, backend: str | None = None, fused: bool | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("z_dim", z_dim), ("hidden", hidden)):
            check_positive_int(name, v)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.dim, self.z_dim, self.loss = dim, z_dim, loss
        self.beta = check_positive_float("beta", beta)
        self.backend = check_backend(backend)
        self.fused = _check_fused(fused)
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, z_dim))
        for m in self.proj:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_h(self, h) -> None:
        if not isinstance(h, torch.Tensor) or h.shape[-1] != self.dim:
            got = getattr(h, "shape", type(h).__name__)
            raise ValueError(f"h must be a tensor with last dim {self.dim}, got {got}")

    def project(self, h: torch.Tensor) -> torch.Tensor:
        self._check_h(h)
        return self.proj(h)

    def forward(self, h: torch.Tensor, z: torch.Tensor, fused: bool | None = None, *,
                token_weight: torch.Tensor | None = None) -> torch.Tensor:
        self._check_h(h)
        fused = _check_fused(fused)
        if fused is None:
            fused = self.fused
        if fused is None:
            fused = FUSED_DEFAULT.get(h.device.type, False)
        if self.loss == "cosine" and fused:
            last = self.proj[-1]
            return ops.projected_cosine_loss(self.proj[:-1](h), last.weight, last.bias, z, backend=self.backend,
                                             token_weight=token_weight)
        z_hat = self.proj(h)
        if self.loss == "cosine":
            return ops.cosine_alignment_loss(z_hat, z, backend=self.backend, token_weight=token_weight)
        if self.loss == "smooth_l1":
            return ops.smooth_l1_alignment_loss(z_hat, z, self.beta, token_weight=token_weight)
        return ops.mse_alignment_loss(z_hat, z, token_weight=token_weight)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, z_dim={self.z_dim}, loss={self.loss!r}, fused={self.fused}"


def _check_fused(fused):
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be True, False or None, got {fused!r}")
    return fused
