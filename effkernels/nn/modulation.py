"""adaLN modules: LayerNorm (or RMSNorm) + modulate, gated residual, and the fused residual + norm + modulate.

Shapes: x, y (B, N, D); shift, scale, gate per sample (B, D) or per token (B, N, D), any row stride
(the chunks of adaLN(c).chunk(6, -1) are passed as they are) but unit stride along D. All float
tensors share x's dtype; statistics are float32 whatever that dtype is.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._common import check_backend, check_positive_float, check_positive_int, unit_last


class _ModulatedNorm(nn.Module):
    """The parameters and checks a modulated norm shares: dim D, eps, an optional learned weight
    (ones at init) and, for LayerNorm, bias (zeros); backend for effkernels.ops."""

    _has_bias = True

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, *,
                 backend: str | None = None):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.eps = check_positive_float("eps", eps)
        if not isinstance(elementwise_affine, bool):
            raise TypeError(f"elementwise_affine must be a bool, got {type(elementwise_affine).__name__}")
        self.elementwise_affine = elementwise_affine
        self.backend = check_backend(backend)
        self.register_parameter("weight", nn.Parameter(torch.ones(dim)) if elementwise_affine else None)
        if self._has_bias:
            self.register_parameter("bias", nn.Parameter(torch.zeros(dim)) if elementwise_affine else None)

    def _check_dim(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.Tensor) and x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim {self.dim} (dim), got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class ModulatedLayerNorm(_ModulatedNorm):
    """LN(x) * (1 + scale) + shift, DiT's `modulate(norm(x), shift, scale)` in one op.

    Args:
        dim: the feature size D.
        eps: LayerNorm's epsilon (DiT uses 1e-6).
        elementwise_affine: learn a LayerNorm weight and bias of shape (D,) (DiT's norms have none,
            so by default the module owns no parameters and an official state dict has no keys here).
        backend: passed to effkernels.ops (None = the usual selection).
    forward(x (B, N, D), shift, scale (B, D) or (B, N, D)) -> (B, N, D), x's dtype.
    """

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        self._check_dim(x)
        x, shift, scale = unit_last(x), unit_last(shift), unit_last(scale)
        return ops.modulate_layernorm(x, shift, scale, self.eps, self.weight, self.bias, backend=self.backend)


class GatedResidual(nn.Module):
    """x + gate * y: adaLN-Zero's gated residual add.

    forward(x (B, N, D), y (B, N, D), gate (B, D) or (B, N, D)) -> (B, N, D).
    """

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = check_backend(backend)

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return ops.gated_residual(unit_last(x), unit_last(y), unit_last(gate), backend=self.backend)


class GatedResidualModulatedLayerNorm(ModulatedLayerNorm):
    """A block's residual add followed by the next LayerNorm + modulate, in one pass over x and y.

    Same constructor as ModulatedLayerNorm (it is the LayerNorm that follows the residual add, so it
    owns that norm's eps and optional affine).
    forward(x, y (B, N, D), gate, shift, scale (B, D) or (B, N, D)) -> (h, out), both (B, N, D):
        h = x + gate * y (the new residual stream), out = LN(h) * (1 + scale) + shift.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_dim(x)
        x, y, gate, shift, scale = (unit_last(t) for t in (x, y, gate, shift, scale))
        return ops.gated_residual_modulate_layernorm(x, y, gate, shift, scale, self.eps, self.weight,
                                                     self.bias, backend=self.backend)


class ModulatedRMSNorm(_ModulatedNorm):
    """RMSNorm(x) * (1 + scale) + shift, ModulatedLayerNorm's RMSNorm twin (LightningDiT's norms).

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, weight (D,) learned (ones at init) unless
    elementwise_affine=False; no bias. Shapes and dtypes as ModulatedLayerNorm.
    """

    _has_bias = False

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, *,
                 backend: str | None = None):
        super().__init__(dim, eps, elementwise_affine, backend=backend)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        self._check_dim(x)
        x, shift, scale = unit_last(x), unit_last(shift), unit_last(scale)
        return ops.rmsnorm_modulate(x, shift, scale, self.eps, self.weight, backend=self.backend)


class GatedResidualModulatedRMSNorm(ModulatedRMSNorm):
    """GatedResidualModulatedLayerNorm's RMSNorm twin: h = x + gate * y, out = RMSNorm(h) * (1 + scale)
    + shift, in one pass. forward(x, y, gate, shift, scale) -> (h, out)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_dim(x)
        x, y, gate, shift, scale = (unit_last(t) for t in (x, y, gate, shift, scale))
        return ops.gated_residual_rmsnorm_modulate(x, y, gate, shift, scale, self.eps, self.weight,
                                                   backend=self.backend)
