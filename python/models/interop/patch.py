"""Patching an official DiT/SiT/REPA model in place: its adaLN-Zero blocks and final layer run effkernels' fused ops
(apply_effkernels), and revert_effkernels restores the original forwards."""
from __future__ import annotations

import types

import torch
from torch import nn

from effkernels import ops
from effkernels.nn import DiTBlock
from effkernels.nn._common import check_backend, unit_last
from effkernels.nn.block import adaln_zero


def _ln_args(norm: nn.LayerNorm):
    return norm.eps, norm.weight, norm.bias


def _fused_block_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The official block's forward on effkernels ops (nn.block.adaln_zero, as DiTBlock runs it):
    same math, the residual add fused into LN2; the block's own attn and mlp modules."""
    be = self._effkernels_backend
    e1, w1, b1 = _ln_args(self.norm1)
    e2, w2, b2 = _ln_args(self.norm2)
    return adaln_zero(
        unit_last(x), c, self.adaLN_modulation, self.attn, self.mlp,
        lambda x, shift, scale: ops.modulate_layernorm(x, shift, scale, e1, w1, b1, backend=be),
        lambda x, y, gate, shift, scale: ops.gated_residual_modulate_layernorm(
            x, unit_last(y), gate, shift, scale, e2, w2, b2, backend=be),
        lambda x, y, gate: ops.gated_residual(x, unit_last(y), gate, backend=be))


def _fused_final_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    mod = self.adaLN_modulation(c)
    shift, scale = mod.to(x.dtype).chunk(2, dim=-1)
    h = ops.modulate_layernorm(unit_last(x), shift, scale, *_ln_args(self.norm_final),
                               backend=self._effkernels_backend)
    return self.linear(h)


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
            m._effkernels_backend = backend
            m.forward = types.MethodType(_fused_block_forward, m)
            patched += 1
        elif _is_official_final(m):
            m._effkernels_backend = backend
            m.forward = types.MethodType(_fused_final_forward, m)
    if patched == 0 and ours == 0:
        raise ValueError(f"found no DiT-style block in {type(model).__name__} (modules with LayerNorm norm1/norm2, "
                         "attn, mlp and adaLN_modulation)")
    return model


def revert_effkernels(model: nn.Module) -> nn.Module:
    """Undo apply_effkernels: every patched module gets its class's forward back."""
    for m in model.modules():
        if "_effkernels_backend" in m.__dict__:
            del m.forward
            del m._effkernels_backend
    return model
