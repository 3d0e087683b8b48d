"""Patching an official DiT/SiT/REPA or LightningDiT model in place: its adaLN-Zero blocks and final layer run
effkernels' fused ops (apply_effkernels), and revert_effkernels restores the original forwards."""
from __future__ import annotations

import types

import torch
from torch import nn

from effkernels import ops
from effkernels.nn import (
    DiTBlock,
    GatedResidual,
    GatedResidualModulatedLayerNorm,
    GatedResidualModulatedRMSNorm,
    ModulatedLayerNorm,
    ModulatedRMSNorm,
)
from effkernels.nn._common import check_backend
from effkernels.nn.block import adaln_zero


def _is_rmsnorm(m) -> bool:
    """torch's nn.RMSNorm, or an RMSNorm class of the LLaMA / LightningDiT kind (class name ending in
    RMSNorm, a (D,) `weight`, a float `eps`, computing x * rsqrt(mean(x^2) + eps) * weight)."""
    if isinstance(m, nn.RMSNorm):
        return m.weight is not None and len(m.normalized_shape) == 1
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.Module) and type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor)
            and w.dim() == 1 and isinstance(getattr(m, "eps", None), float))


def _is_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) or _is_rmsnorm(m)


def _fused_norm(first: bool, norm: nn.Module, backend: str | None):
    """The fused modulated norm (first: norm + modulate; else the gated-residual pair) for an official
    LayerNorm or RMSNorm, with its eps and the same Parameter objects (nothing copied; the model's
    state dict does not change). nn.RMSNorm's eps None is torch's default, the dtype's eps."""
    if _is_rmsnorm(norm):
        eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
        fused = (ModulatedRMSNorm if first else GatedResidualModulatedRMSNorm)(norm.weight.shape[0], eps,
                                                                               backend=backend)
        fused.weight = norm.weight
        return fused
    fused = (ModulatedLayerNorm if first else GatedResidualModulatedLayerNorm)(norm.normalized_shape[-1], norm.eps,
                                                                               backend=backend)
    fused.weight, fused.bias = norm.weight, norm.bias
    return fused


class _FusedParts:
    """An official block's parts in the form nn.block.adaln_zero takes: the block's own attn and
    mlp, and fused norms sharing its norms' parameters. Not a module (nothing is registered)."""

    def __init__(self, block: nn.Module, backend: str | None):
        self.attn, self.mlp = block.attn, block.mlp
        self.norm1 = _fused_norm(True, block.norm1, backend)
        self.norm2 = _fused_norm(False, block.norm2, backend)
        self.residual = GatedResidual(backend=backend)


def _fused_block_forward(self, x: torch.Tensor, c: torch.Tensor, feat_rope=None) -> torch.Tensor:
    """The official block's forward on effkernels ops, the arithmetic DiTBlock runs (adaln_zero).
    LightningDiT's third argument, its rotary module, reaches the block's attention as rope=."""
    kw = {} if feat_rope is None else {"rope": feat_rope}
    return adaln_zero(x, self.adaLN_modulation(c), self._effkernels_parts, **kw)


class _Marker:
    """What apply_effkernels leaves on a module whose forward it replaced (revert_effkernels' cue)."""


def _fused_swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A SwiGLUFFN's forward (w3(silu(a) * b), (a, b) = w12(x).chunk(2)) with effkernels.ops.swiglu."""
    a, b = self.w12(x).chunk(2, dim=-1)
    return self.w3(ops.swiglu(a, b, backend=self._effkernels_parts.backend))


def _fused_final_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=-1)
    return self.linear(self._effkernels_parts(x, shift, scale))


def _has(m: nn.Module, name: str, kind: type) -> bool:
    return isinstance(getattr(m, name, None), kind)


def _six_chunks(m: nn.Module) -> bool:
    """adaLN_modulation's last Linear gives 6 chunks of the block's width (not LightningDiT's wo_shift 4)."""
    last = [x for x in m.adaLN_modulation.modules() if isinstance(x, nn.Linear)]
    w = m.norm1.weight if getattr(m.norm1, "weight", None) is not None else None
    d = w.shape[0] if w is not None else m.norm1.normalized_shape[-1]
    return bool(last) and last[-1].out_features == 6 * d


def _is_official_block(m: nn.Module) -> bool:
    return (_is_norm(getattr(m, "norm1", None)) and _is_norm(getattr(m, "norm2", None))
            and _has(m, "attn", nn.Module) and _has(m, "mlp", nn.Module) and _has(m, "adaLN_modulation", nn.Module)
            and _six_chunks(m))


def _is_official_final(m: nn.Module) -> bool:
    return (_is_norm(getattr(m, "norm_final", None)) and _has(m, "linear", nn.Linear)
            and _has(m, "adaLN_modulation", nn.Module))


def _is_swiglu_ffn(m: nn.Module) -> bool:
    """DINOv2's / LightningDiT's SwiGLUFFN: w12 Linear(D, 2H), w3 Linear(H, D)."""
    return (_has(m, "w12", nn.Linear) and _has(m, "w3", nn.Linear)
            and m.w12.out_features == 2 * m.w3.in_features and not _has(m, "fc1", nn.Linear))


def apply_effkernels(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Swap effkernels' fused adaLN ops into an existing DiT-style model, in place; returns the model.

    Every submodule shaped like the official DiT/SiT block (norm1, norm2 LayerNorms over D, attn,
    mlp, adaLN_modulation producing 6 chunks, forward(x, c)) gets a forward computing
      h = LN1(x)(1 + scale1) + shift1;  x = x + gate1 * attn(h)  fused with  h = LN2(x)(1 + scale2) + shift2;
      x = x + gate2 * mlp(h)
    with effkernels ops; the model's own attn and mlp modules (and weights) are kept. Final layers
    (norm_final, linear, adaLN_modulation) get the fused LN + modulate. LightningDiT's blocks
    (hustvl/LightningDiT: RMSNorm norm1/norm2 with weights, forward(x, c, feat_rope)) get the same
    with the fused RMSNorm ops, feat_rope passed to their attention as rope=, and their SwiGLUFFN
    MLPs (w12, w3) effkernels.ops.swiglu; their attention and its RoPE tables are kept as they are.
    wo_shift blocks (4 chunks) are left alone. The patch is an instance
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
            m.__dict__["_effkernels_parts"] = _fused_norm(True, m.norm_final, backend)
            m.forward = types.MethodType(_fused_final_forward, m)
        elif _is_swiglu_ffn(m):
            marker = _Marker()
            marker.backend = backend
            m.__dict__["_effkernels_parts"] = marker
            m.forward = types.MethodType(_fused_swiglu_forward, m)
    if patched == 0 and ours == 0:
        raise ValueError(f"found no DiT-style block in {type(model).__name__} (modules with LayerNorm or RMSNorm "
                         "norm1/norm2, attn, mlp and a 6-chunk adaLN_modulation)")
    return model


def revert_effkernels(model: nn.Module) -> nn.Module:
    """Undo apply_effkernels: every patched module gets its class's forward back."""
    for m in model.modules():
        if "_effkernels_parts" in m.__dict__:
            del m.forward
            del m._effkernels_parts
    return model
