"""The in-memory data set the trainer reads: images or latents x (N, C, H, W) with labels y (N,)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


class DataError(ValueError):
    """Bad data: a missing path or a malformed file; the message names it."""


@dataclass
class ArrayDataset:
    """Images or latents x (N, C, H, W) float32 and labels y (N,) int64, in memory."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    value_range: tuple | None = (-1.0, 1.0)
    extras: dict = field(default_factory=dict)  # name -> (N, ...) tensor, one row per sample

    def __post_init__(self):
        if self.x.dim() != 4:
            raise DataError(f"{self.name}: data must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise DataError(f"{self.name}: {self.x.shape[0]} samples but labels of shape {tuple(self.y.shape)}")
        if self.x.shape[0] == 0:
            raise DataError(f"{self.name}: the data set is empty")
        if self.x.shape[2] != self.x.shape[3]:
            raise DataError(f"{self.name}: images must be square, got {self.x.shape[2]}x{self.x.shape[3]}")
        if not torch.isfinite(self.x).all():
            raise DataError(f"{self.name}: data contains NaN or inf")
        if int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes:
            raise DataError(f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                            f"[{int(self.y.min())}, {int(self.y.max())}]")
        for k, v in self.extras.items():
            if not torch.is_tensor(v) or v.dim() < 1 or v.shape[0] != self.x.shape[0]:
                raise DataError(f"{self.name}: extra array {k!r} must have one row per sample ({self.x.shape[0]}), "
                                f"got {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise DataError(f"{self.name}: extra array {k!r} contains NaN or inf")

    def __len__(self):
        return self.x.shape[0]

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def size(self) -> int:
        return self.x.shape[2]

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels (16 hex digits): the cache key of metric feature networks."""
        h = hashlib.sha256()
        h.update(str(tuple(self.x.shape)).encode())
        h.update(self.x.contiguous().numpy().tobytes())
        h.update(self.y.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def split(self, holdout: float = 0.2, seed: int = 0):
        """(train, held-out) index tensors: a fixed, seeded, stratified-enough random split."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        n_hold = max(1, round(holdout * len(self)))
        return perm[n_hold:], perm[:n_hold]
