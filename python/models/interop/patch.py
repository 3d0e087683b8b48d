"""Patching an official DiT/SiT/REPA model in place: its adaLN-Zero blocks and final layer run effkernels' fused ops
(apply_effkernels), and revert_effkernels restores the original forwards."""
from __future__ import annotations

import types

import torch
from torch import nn

from effkernels.nn import DiTBlock, GatedResidual, GatedResidualModulatedLayerNorm, ModulatedLayerNorm
from effkernels.nn._common import check_backend
from effkernels.nn.block import adaln_zero


def _fused_norm(cls, ln: nn.LayerNorm, backend: str | None):
    """A fused norm of `cls` with the official LayerNorm's eps, weight and bias (the same Parameter
    objects, so nothing is copied and the model's state dict does not change)."""
    norm = cls(ln.normalized_shape[-1], ln.eps, backend=backend)
    norm.weight, norm.bias = ln.weight, ln.bias
    return norm


class _FusedParts:
    """An official block's parts in the form nn.block.adaln_zero takes: the block's own attn and
    mlp, and fused norms sharing its LayerNorms' parameters. Not a module (nothing is registered)."""

    def __init__(self, block: nn.Module, backend: str | None):
        self.attn, self.mlp = block.attn, block.mlp
        self.norm1 = _fused_norm(ModulatedLayerNorm, block.norm1, backend)
        self.norm2 = _fused_norm(GatedResidualModulatedLayerNorm, block.norm2, backend)
        self.residual = GatedResidual(backend=backend)


def _fused_block_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The official block's forward on effkernels ops, the arithmetic DiTBlock runs (adaln_zero)."""
    return adaln_zero(x, self.adaLN_modulation(c), self._effkernels_parts)


def _fused_final_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=-1)
    return self.linear(self._effkernels_parts(x, shift, scale))


def _has(m: nn.Module, name: str, kind: type) -> bool:
    return isinstance(getattr(m, name, None), kind)


def _is_official_block(m: nn.Module) -> bool:
    return (_has(m, "norm1", nn.LayerNorm) and _has(m, "norm2", nn.LayerNorm) and _has(m, "attn", nn.Module)
            and _has(m, "mlp", nn.Module) and _has(m, "adaLN_modulation", nn.Module))


def _is_official_final(m: nn.Module) -> bool:
    return (_has(m, "norm_final", nn.LayerNorm) and _has(m, "linear", nn.Linear)
            and _has(m, "adaLN_modulation", nn.Module))


def apply_effkernels(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Swap effkernels' fused adaLN ops into an existing DiT-style model, in place; returns the model.

    Every submodule shaped like the official DiT/SiT block (norm1, norm2 LayerNorms over D, attn,
    mlp, adaLN_modulation producing 6 chunks, forward(x, c)) gets a forward computing
      h = LN1(x)(1 + scale1) + shift1;  x = x + gate1 * attn(h)  fused with  h = LN2(x)(1 + scale2) + shift2;
      x = x + gate2 * mlp(h)
    with effkernels ops; the model's own attn and mlp modules (and weights) are kept. Final layers
    (norm_final, linear, adaLN_modulation) get the fused LN + modulate. The patch is an instance
    attribute, so revert_effkernels (or deleting `forward`) restores the class's forward.
    Models already built from effkernels.nn are returned unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    patched = ours = 0
    for m in model.modules():
        if isinstance(m, DiTBlock):
            ours += 1
        elif _is_official_block(m):
            m.__dict__["_effkernels_parts"] = _FusedParts(m, backend)  # not registered: state dict unchanged
            m.forward = types.MethodType(_fused_block_forward, m)
            patched += 1
        elif _is_official_final(m):
            m.__dict__["_effkernels_parts"] = _fused_norm(ModulatedLayerNorm, m.norm_final, backend)
            m.forward = types.MethodType(_fused_final_forward, m)
    if patched == 0 and ours == 0:
        raise ValueError(f"found no DiT-style block in {type(model).__name__} (modules with LayerNorm norm1/norm2, "
                         "attn, mlp and adaLN_modulation)")
    return model


def revert_effkernels(model: nn.Module) -> nn.Module:
    """Undo apply_effkernels: every patched module gets its class's forward back."""
    for m in model.modules():
        if "_effkernels_parts" in m.__dict__:
            del m.forward
            del m._effkernels_parts
    return model
