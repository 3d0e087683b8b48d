"""Fused adaLN kernels inside diffusers' transformers, patched in place by module type.

    from effkernels.integrations.diffusers import apply_effkernels, revert
    report = apply_effkernels(model)   # DiT / PixArt / SD3 / Flux transformer (an nn.Module), in place
    print(report)                      # what was patched and what was left, each by module name
    revert(model)                      # diffusers' own forwards again (bit-identical outputs)

What is patched (diffusers DIFFUSERS_REQUIREMENT; the patched forwards repeat that version's block
code with the norm + modulate + gated residual steps swapped for effkernels.ops):
  norm modules    AdaLayerNormZero, AdaLayerNormZeroSingle, SD35AdaLayerNormZeroX and
                  AdaLayerNormContinuous (LayerNorm flavour): LN(x) * (1 + scale) + shift as one
                  op, modulate_layernorm, on the strided (B, D) chunks of their linear's output.
  blocks          BasicTransformerBlock (norm_type ada_norm_zero: DiT; ada_norm_single: PixArt's
                  scale-shift table), JointTransformerBlock (SD3, SD3.5 dual attention),
                  SD3SingleTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock: each
                  gated residual x + gate * y is gated_residual, and a residual add followed by the
                  next LayerNorm + modulate is gated_residual_modulate_layernorm (one pass).
Anything else that looks like adaLN (a class whose name has AdaLayerNorm/NormZero, or ends in
TransformerBlock) is reported as left, with the reason; so is the final-layer modulation that DiT's
and PixArt's model forward computes inline (it is not a module of its own).

Contracts:
- In place: only `forward` is replaced, per instance (bound into the module's __dict__, as
  Liger-Kernel does); no parameter, buffer or submodule is added, removed or renamed, so
  state_dict keys, named_parameters, optimizers over model.parameters(), checkpoints and LoRA
  layers (peft swaps the nn.Linear submodules, which the patched forwards call by attribute) are
  unchanged. A subclass that overrides forward, or a module whose forward is already replaced by
  someone else (accelerate hooks), is left and reported.
- Dtypes: every op computes in the promoted dtype of the tensors diffusers' code combines at that
  point (what its own arithmetic would produce), statistics in float32. Under CUDA autocast,
  diffusers' LayerNorm returns float32 where the fused op returns the inputs' dtype (bf16); the
  next linear casts to bf16 either way.
- Runtime features outside the fused path (GLIGEN kwargs, a non-3-D input) run diffusers' own
  forward for that call, unchanged.
- The diffusers version is checked at patch time: outside DIFFUSERS_REQUIREMENT a RuntimeError
  (allow_other_versions=True patches anyway, at the caller's risk: the blocks' code may differ).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from ..backends import BACKENDS

logger = logging.getLogger(__name__)

# The one declaration of the supported range; pyproject.toml's `diffusers` extra repeats it (a test
# keeps the two equal). Tested against 0.42.1.
DIFFUSERS_REQUIREMENT = "diffusers>=0.42,<0.43"
_MARK = "_effkernels_patch"  # instance attribute naming what a patched module's forward does
_BACKEND = "_effkernels_backend"


# ---------------------------------------------------------------------------------------------
# Version check
# ---------------------------------------------------------------------------------------------

def _version_tuple(v: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", v)
    if not m:
        raise RuntimeError(f"cannot read the diffusers version {v!r}")
    return tuple(int(p or 0) for p in m.groups())


def supported_range() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lowest supported, first unsupported) version tuples, read from DIFFUSERS_REQUIREMENT."""
    lo = re.search(r">=\s*([\d.]+)", DIFFUSERS_REQUIREMENT).group(1)
    hi = re.search(r"<\s*([\d.]+)", DIFFUSERS_REQUIREMENT).group(1)
    return _version_tuple(lo), _version_tuple(hi)


def check_diffusers_version(version: str) -> None:
    """RuntimeError unless `version` lies in DIFFUSERS_REQUIREMENT (a pre-release of the upper bound,
    e.g. 0.43.0.dev0, lies outside)."""
    lo, hi = supported_range()
    v = _version_tuple(version)
    if not lo <= v < hi:
        raise RuntimeError(
            f"diffusers {version} is outside the range effkernels' diffusers patches support "
            f"({DIFFUSERS_REQUIREMENT}; pip install 'effkernels[diffusers]'). The patched forwards repeat "
            "the blocks' code of that range, which other versions may have changed; pass "
            "allow_other_versions=True to patch anyway and check the outputs yourself.")


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("effkernels.integrations.diffusers needs diffusers: pip install 'effkernels[diffusers]'") from e
    return diffusers


# ---------------------------------------------------------------------------------------------
# The fused steps, in the dtype diffusers' own arithmetic would give
# ---------------------------------------------------------------------------------------------

def _dtype(*ts) -> torch.dtype:
    dt = None
    for t in ts:
        if t is not None:
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt


def _cast(t, dt):
    """t in dtype dt with unit stride along its last dim (strided rows kept as they are)."""
    if t is None:
        return None
    if t.dtype != dt:
        t = t.to(dt)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _mod(m: torch.Tensor) -> torch.Tensor:
    """A (B, 1, D) modulation (PixArt's table chunks) as the (B, D) view the ops take."""
    return m.squeeze(1) if m.dim() == 3 and m.shape[1] == 1 else m


def modulate(x, norm: nn.LayerNorm, shift, scale, backend):
    """norm(x) * (1 + scale) + shift for a LayerNorm module `norm`, in one op."""
    shift, scale = _mod(shift), _mod(scale)
    dt = _dtype(x, shift, scale, norm.weight, norm.bias)
    return ops.modulate_layernorm(_cast(x, dt), _cast(shift, dt), _cast(scale, dt), norm.eps,
                                  _cast(norm.weight, dt), _cast(norm.bias, dt), backend=backend)


def gated(x, y, gate, backend):
    """x + gate * y (gate per sample (B, D) or per token), in one op."""
    gate = _mod(gate)
    dt = _dtype(x, y, gate)
    return ops.gated_residual(_cast(x, dt), _cast(y, dt), _cast(gate, dt), backend=backend)


def gated_then_modulate(x, y, gate, shift, scale, norm: nn.LayerNorm, backend):
    """(h, norm(h) * (1 + scale) + shift) with h = x + gate * y: one fused op when diffusers' code
    would give h and the modulated output one dtype, else the two ops in their own dtypes."""
    gate, shift, scale = _mod(gate), _mod(shift), _mod(scale)
    dh = _dtype(x, y, gate)
    dt = _dtype(x, y, gate, shift, scale, norm.weight, norm.bias)
    if dh != dt:
        h = gated(x, y, gate, backend)
        return h, modulate(h, norm, shift, scale, backend)
    c = [_cast(t, dt) for t in (x, y, gate, shift, scale, norm.weight, norm.bias)]
    return ops.gated_residual_modulate_layernorm(*c[:5], norm.eps, c[5], c[6], backend=backend)


def _feed_forward(ff: nn.Module, x: torch.Tensor, chunk_size, chunk_dim: int) -> torch.Tensor:
    """ff(x), in chunks of `chunk_size` along `chunk_dim` when set (diffusers' set_chunk_feed_forward)."""
    if chunk_size is None:
        return ff(x)
    n = x.shape[chunk_dim]
    if n % chunk_size:
        raise ValueError(f"the feed-forward's input dim {chunk_dim} ({n}) must be a multiple of chunk_size {chunk_size}")
    return torch.cat([ff(c) for c in x.chunk(n // chunk_size, dim=chunk_dim)], dim=chunk_dim)


def _b(module) -> str | None:
    return module.__dict__.get(_BACKEND)


# ---------------------------------------------------------------------------------------------
# Norm modules' forwards (same signatures and returns as diffusers')
# ---------------------------------------------------------------------------------------------

def _ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """AdaLayerNormZero: (LN(x) * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
    if x.dim() != 3:
        return type(self).forward(self, x, timestep, class_labels, hidden_dtype, emb)
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))  # (B, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)  # (B, D), row stride 6D
    return modulate(x, self.norm, shift_msa, scale_msa, _b(self)), gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_zero_single_forward(self, x, emb=None):
    """AdaLayerNormZeroSingle: (LN(x) * (1 + scale) + shift, gate)."""
    if x.dim() != 3:
        return type(self).forward(self, x, emb)
    shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
    return modulate(x, self.norm, shift, scale, _b(self)), gate


def _ada_zero_x_forward(self, hidden_states, emb=None):
    """SD35AdaLayerNormZeroX: the two modulations of one LayerNorm, each fused with it."""
    if hidden_states.dim() != 3:
        return type(self).forward(self, hidden_states, emb)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(9, dim=1)
    b = _b(self)
    out = modulate(hidden_states, self.norm, shift_msa, scale_msa, b)
    out2 = modulate(hidden_states, self.norm, shift_msa2, scale_msa2, b)
    return out, gate_msa, shift_mlp, scale_mlp, gate_mlp, out2, gate_msa2


def _ada_continuous_forward(self, x, conditioning_embedding):
    """AdaLayerNormContinuous (LayerNorm flavour): LN(x) * (1 + scale) + shift, scale first in its linear."""
    if x.dim() != 3:
        return type(self).forward(self, x, conditioning_embedding)
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return modulate(x, self.norm, shift, scale, _b(self))


# ---------------------------------------------------------------------------------------------
# Blocks' forwards (same signatures and returns as diffusers')
# ---------------------------------------------------------------------------------------------

def _basic_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                         encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                         class_labels=None, added_cond_kwargs=None):
    """BasicTransformerBlock with norm_type ada_norm_zero (DiT) or ada_norm_single (PixArt)."""
    if hidden_states.dim() != 3 or (cross_attention_kwargs and cross_attention_kwargs.get("gligen") is not None):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    b = _b(self)
    kw = {k: v for k, v in (cross_attention_kwargs or {}).items() if k != "gligen"}
    if self.norm_type == "ada_norm_zero":
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
        mlp_norm = self.norm3
    else:  # ada_norm_single: timestep is (B, 6D), added to the block's (6, D) table
        mods = self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(1)  # (B, D), row stride 6D
        norm_h = modulate(hidden_states, self.norm1, shift_msa, scale_msa, b)
        mlp_norm = self.norm2
    attn = self.attn1(norm_h, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                      attention_mask=attention_mask, **kw)
    if self.attn2 is None:
        h, norm_h = gated_then_modulate(hidden_states, attn, gate_msa, shift_mlp, scale_mlp, mlp_norm, b)
    else:
        h = gated(hidden_states, attn, gate_msa, b)
        # DiT-style blocks norm before the cross-attention (norm2); PixArt feeds h as it is
        q = self.norm2(h) if self.norm_type == "ada_norm_zero" else h
        h = self.attn2(q, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kw) + h
        norm_h = modulate(h, mlp_norm, shift_mlp, scale_mlp, b)
    ff = _feed_forward(self.ff, norm_h, self._chunk_size, self._chunk_dim)
    return gated(h, ff, gate_mlp, b)


def _joint_block_forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    """JointTransformerBlock (SD3 / SD3.5): -> (encoder_hidden_states or None, hidden_states)."""
    b = _b(self)
    kw = joint_attention_kwargs or {}
    if self.use_dual_attention:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = self.norm1(hidden_states, emb=temb)
    else:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    if self.context_pre_only:
        norm_c = self.norm1_context(encoder_hidden_states, temb)
    else:
        norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    attn, ctx_attn = self.attn(hidden_states=norm_h, encoder_hidden_states=norm_c, **kw)
    if self.use_dual_attention:
        h = gated(hidden_states, attn, gate_msa, b)
        attn2 = self.attn2(hidden_states=norm_h2, **kw)
        h, norm_h = gated_then_modulate(h, attn2, gate_msa2, shift_mlp, scale_mlp, self.norm2, b)
    else:
        h, norm_h = gated_then_modulate(hidden_states, attn, gate_msa, shift_mlp, scale_mlp, self.norm2, b)
    h = gated(h, _feed_forward(self.ff, norm_h, self._chunk_size, self._chunk_dim), gate_mlp, b)
    if self.context_pre_only:
        return None, h
    c, norm_c = gated_then_modulate(encoder_hidden_states, ctx_attn, c_gate_msa, c_shift_mlp, c_scale_mlp,
                                    self.norm2_context, b)
    c = gated(c, _feed_forward(self.ff_context, norm_c, self._chunk_size, self._chunk_dim), c_gate_mlp, b)
    return c, h


def _sd3_single_block_forward(self, hidden_states, temb):
    """SD3SingleTransformerBlock (SD3 ControlNet): DiT's block without cross-attention."""
    b = _b(self)
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    attn = self.attn(hidden_states=norm_h, encoder_hidden_states=None)
    h, norm_h = gated_then_modulate(hidden_states, attn, gate_msa, shift_mlp, scale_mlp, self.norm2, b)
    return gated(h, self.ff(norm_h), gate_mlp, b)


def _flux_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                        joint_attention_kwargs=None):
    """FluxTransformerBlock (double stream): -> (encoder_hidden_states, hidden_states)."""
    b = _b(self)
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
    outs = self.attn(hidden_states=norm_h, encoder_hidden_states=norm_c, image_rotary_emb=image_rotary_emb,
                     **(joint_attention_kwargs or {}))
    attn, ctx_attn = outs[0], outs[1]  # a third output is IP-Adapter's, added after the MLP
    h, norm_h = gated_then_modulate(hidden_states, attn, gate_msa, shift_mlp, scale_mlp, self.norm2, b)
    h = gated(h, self.ff(norm_h), gate_mlp, b)
    if len(outs) == 3:
        h = h + outs[2]
    c, norm_c = gated_then_modulate(encoder_hidden_states, ctx_attn, c_gate_msa, c_shift_mlp, c_scale_mlp,
                                    self.norm2_context, b)
    c = gated(c, self.ff_context(norm_c), c_gate_mlp, b)
    if c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, h


def _flux_single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                               joint_attention_kwargs=None):
    """FluxSingleTransformerBlock: text and image tokens as one sequence, attention and MLP in parallel."""
    text_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, T + N, D)
    norm_x, gate = self.norm(x, emb=temb)
    mlp = self.act_mlp(self.proj_mlp(norm_x))
    attn = self.attn(hidden_states=norm_x, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    x = gated(x, self.proj_out(torch.cat([attn, mlp], dim=2)), gate, _b(self))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_len], x[:, text_len:]


# ---------------------------------------------------------------------------------------------
# Which module gets which forward
# ---------------------------------------------------------------------------------------------

def _is_layer_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def _rules():
    """[(diffusers class, forward, check(module) -> None or the reason it is left, what)], in the
    installed diffusers."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
        SD35AdaLayerNormZeroX,
    )
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from diffusers.models.transformers.transformer_sd3 import SD3SingleTransformerBlock

    def norm_ok(m):
        return None if _is_layer_norm(m.norm) else f"its norm is {type(m.norm).__name__}, not a LayerNorm (no fused op for it)"

    def basic_ok(m):
        if m.norm_type not in ("ada_norm_zero", "ada_norm_single"):
            return f"norm_type {m.norm_type!r} is not covered (ada_norm_zero and ada_norm_single are)"
        if m.pos_embed is not None:
            return "its sinusoidal pos_embed between norm and attention is not covered"
        # ada_norm_zero: norm1 is an AdaLayerNormZero (its own rule), norm3 the MLP's LayerNorm;
        # ada_norm_single: norm1 and norm2 are the LayerNorms the block modulates itself
        names = ("norm3",) if m.norm_type == "ada_norm_zero" else ("norm1", "norm2")
        bad = [n for n in names if not _is_layer_norm(getattr(m, n))]
        if bad:
            return f"{', '.join(bad)} not LayerNorm"
        return None

    def layer_norms(*names):
        def ok(m):
            bad = [n for n in names if getattr(m, n, None) is not None and not _is_layer_norm(getattr(m, n))]
            return f"{', '.join(bad)} not LayerNorm" if bad else None
        return ok

    lnmod = "LN + modulate fused (modulate_layernorm)"
    return [
        (AdaLayerNormZero, _ada_zero_forward, norm_ok, lnmod),
        (AdaLayerNormZeroSingle, _ada_zero_single_forward, norm_ok, lnmod),
        (SD35AdaLayerNormZeroX, _ada_zero_x_forward, norm_ok, lnmod + ", both modulations"),
        (AdaLayerNormContinuous, _ada_continuous_forward, norm_ok, lnmod),
        (BasicTransformerBlock, _basic_block_forward, basic_ok,
         "gated residuals (gated_residual); attention residual + norm + modulate fused "
         "(gated_residual_modulate_layernorm) when the block has no cross-attention"),
        (JointTransformerBlock, _joint_block_forward, layer_norms("norm2", "norm2_context"),
         "gated residuals; attention residual + norm2 + modulate fused, both streams"),
        (SD3SingleTransformerBlock, _sd3_single_block_forward, layer_norms("norm2"),
         "gated residuals; attention residual + norm2 + modulate fused"),
        (FluxTransformerBlock, _flux_block_forward, layer_norms("norm2", "norm2_context"),
         "gated residuals; attention residual + norm2 + modulate fused, both streams"),
        (FluxSingleTransformerBlock, _flux_single_block_forward, lambda m: None, "gated residual (gated_residual)"),
    ]


# Names of classes that look like adaLN or a transformer block: reported when not patched.
_LOOKS_ADALN = re.compile(r"(Ada\w*Norm|NormZero|TransformerBlock)")

# Classes that match _LOOKS_ADALN but hold nothing to fuse: left, with this reason.
_NOTHING_TO_FUSE = {
    "AdaLayerNormSingle": "computes PixArt's (B, 6D) modulation table only (no norm in it); the blocks that "
                          "apply it are patched",
}

# Model classes whose own forward modulates the final norm inline (not a module we can swap).
_INLINE_FINAL = {
    "DiTTransformer2DModel": "norm_out",
    "PixArtTransformer2DModel": "norm_out",
}


@dataclass
class PatchReport:
    """What apply_effkernels / revert did, by module name (as in model.named_modules())."""
    model: str
    diffusers: str
    backend: str | None
    patched: dict[str, str] = field(default_factory=dict)  # name -> "<class>: what its forward fuses"
    left: dict[str, str] = field(default_factory=dict)  # name -> "<class>: why it was left"
    reverted: dict[str, str] = field(default_factory=dict)  # revert(): name -> class
    action: str = "apply"  # or "revert"

    def counts(self) -> dict[str, int]:
        """Patched modules per class name."""
        out: dict[str, int] = {}
        for what in self.patched.values():
            cls = what.split(":", 1)[0]
            out[cls] = out.get(cls, 0) + 1
        return out

    def __str__(self) -> str:
        if self.action == "revert":
            return f"effkernels revert on {self.model}: {len(self.reverted)} modules back to diffusers' forwards"
        lines = [f"effkernels on {self.model} (diffusers {self.diffusers}, backend {self.backend or 'auto'}): "
                 f"{len(self.patched)} modules patched ("
                 + ", ".join(f"{n} {c}" for c, n in sorted(self.counts().items())) + f"), {len(self.left)} left"]
        lines += [f"  left {name}: {why}" for name, why in self.left.items()]
        return "\n".join(lines)


def apply_effkernels(model: nn.Module, *, backend: str | None = None, allow_other_versions: bool = False,
                     log: bool = True) -> PatchReport:
    """Swap the fused adaLN ops into every supported module of `model` (any nn.Module holding
    diffusers modules), in place; returns the report (also logged, at INFO, or WARNING when nothing
    was patched). backend: passed to every op (None: the usual selection, effkernels.backends).
    Patching twice is a no-op for modules already patched (their entry says so)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    version = _diffusers().__version__
    if not allow_other_versions:
        check_diffusers_version(version)
    rules = _rules()
    report = PatchReport(type(model).__name__, version, backend)
    for name, m in model.named_modules():
        label = name or "(model)"
        cls = type(m).__name__
        rule = next((r for r in rules if isinstance(m, r[0])), None)
        if rule is None:
            if _LOOKS_ADALN.search(cls):
                report.left[label] = f"{cls}: {_NOTHING_TO_FUSE.get(cls, 'type not covered')}"
            continue
        base, fwd, check, what = rule
        if _MARK in m.__dict__:
            report.patched[label] = f"{cls}: {what} (already patched)"
            continue
        if type(m).forward is not base.forward:
            report.left[label] = f"{cls}: a subclass of {base.__name__} with its own forward"
            continue
        if "forward" in m.__dict__:
            report.left[label] = f"{cls}: its forward was already replaced by other code (e.g. accelerate hooks)"
            continue
        why = check(m)
        if why:
            report.left[label] = f"{cls}: {why}"
            continue
        m.__dict__["forward"] = fwd.__get__(m, type(m))
        m.__dict__[_MARK] = what
        m.__dict__[_BACKEND] = backend
        report.patched[label] = f"{cls}: {what}"
    final = _INLINE_FINAL.get(type(model).__name__)
    if final is not None:
        report.left[final] = (f"{type(getattr(model, final)).__name__}: the final layer's modulation is computed "
                              f"inline in {type(model).__name__}.forward, not by a module")
    if log:
        (logger.info if report.patched else logger.warning)("%s", report)
    return report


def revert(model: nn.Module) -> PatchReport:
    """Undo apply_effkernels on every module of `model`: diffusers' own forwards again, so the
    outputs are bit-identical to an unpatched model's. Modules not patched are untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport(type(model).__name__, "", None, action="revert")
    for name, m in model.named_modules():
        if _MARK in m.__dict__:
            m.__dict__.pop("forward", None)
            del m.__dict__[_MARK]
            m.__dict__.pop(_BACKEND, None)
            report.reverted[name or "(model)"] = type(m).__name__
    logger.info("%s", report)
    return report


def patched_modules(model: nn.Module) -> dict[str, str]:
    """{module name: what its patched forward fuses} for the modules apply_effkernels patched."""
    return {name or "(model)": m.__dict__[_MARK] for name, m in model.named_modules() if _MARK in m.__dict__}
