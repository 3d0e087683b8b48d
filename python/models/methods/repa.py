"""REPA: representation alignment (Yu et al., sihyun-yu/REPA).

The hidden state after block k (the residual stream, no norm) goes through a per-token projector
(effkernels.nn.AlignmentHead: Linear-SiLU-Linear-SiLU-Linear) and is pulled towards a frozen
encoder's patch tokens of the CLEAN input x (never x_t) by the fused negative-cosine loss
(effkernels.ops.cosine_alignment_loss: float32 math, every sample counts 1/B). The term is
weight x loss (0.5) at every t, added to SiT's flow loss. Several encoders may be given at once
(--repa-encoder repeatable): one projector each, their losses averaged.

Composition: with TREAD the hidden state is the full sequence (the backbone fills the routed tokens
in), so the target is used as it is; with a token plan that sets keep_idx (MaskDiT) the hidden state
holds the kept tokens only, and the target is gathered at the same index; with a packed keep index
(MaskDiT's --mask-ratio-range: a count per sample) the packed rows are weighted 1 / (B * count), so
every sample weighs what it does at a fixed count.

Parts: the projectors are the method's module `repa_projectors` (optimised, DDP-wrapped,
checkpointed; keys repa_projectors.<i>.proj.{0,2,4}.* mirror REPA's projectors.<i>.{0,2,4}.*). The
encoders are frozen, never in modules(), moved to the data's device in attach(); see
effkernels.models.methods.encoders for the encoder protocol and the specs.
"""
from __future__ import annotations

import itertools
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from effkernels import ops
from effkernels.nn import AlignmentHead
from effkernels.nn.routing import TokenPack

from . import encoders as enc
from .base import ConfigError, Method
from ..options import TrainOptions, add_options, opt, read_options
from .registry import register_method

# REPA's depths (its paper): k = 4 for B (depth 12), 8 for L/XL (depth 24/28). S shares B's depth
# 12 and gets 4. Other depths (tiny/2 has 6): a third of the way up, REPA's own ratio (4/12, 8/24),
# so tiny/2 aligns after block 2.
DEPTH_BY_MODEL_DEPTH = {12: 4, 24: 8, 28: 8}


def default_depth(depth: int) -> int:
    return DEPTH_BY_MODEL_DEPTH.get(depth, max(1, round(depth / 3)))


def default_proj_dim(width: int) -> int:
    """REPA's 2048 for the real sizes (width >= 384: S, B, L, XL); 256 for the CPU models (width 64 and
    below), where a 2048-wide projector would hold ~30x the backbone's parameters."""
    return 2048 if width >= 384 else 256


def npz_array_dim(path, key: str) -> int:
    """The last dimension of array `key` in a .npz, read from its header (the array is not loaded)."""
    if not isinstance(path, str) or not path.endswith(".npz") or not os.path.isfile(path):
        raise ConfigError(f"--repa-encoder precomputed:{key} reads features from --data, which must be the .npz "
                          f"written by effkernels-features; got --data {path!r}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if key not in names:
                raise ConfigError(f"--repa-encoder precomputed:{key}: --data {path!r} has no array {key!r} "
                                  f"(it has {', '.join(sorted(names))})")
            with zf.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                shape = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                         else np.lib.format.read_array_header_2_0(f))[0]
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--repa-encoder precomputed:{key}: cannot read {path!r} ({type(e).__name__}: {e})") from e
    if len(shape) != 3:
        raise ConfigError(f"--repa-encoder precomputed:{key}: array {key!r} in {path!r} must be (N, tokens, dim), "
                          f"got shape {shape}")
    return int(shape[2])


def _value_range(spec):
    if spec is None:
        return None
    try:
        lo, hi = (float(v) for v in str(spec).split(","))
        assert hi > lo
    except (ValueError, AssertionError):
        raise ConfigError(f"--repa-value-range must be LO,HI with LO < HI, got {spec!r}") from None
    return lo, hi


@dataclass
class REPAOptions:
    repa_encoder: list | None = opt(None, "target encoder (repeatable: one projector each, losses averaged). 'dae' "
                                          '(default): an autoencoder trained on the data set itself and cached, for '
                                          "small data such as digits; 'dinov2-vitb14:/path/weights.pth' (also "
                                          "vits14/vitl14/vitg14, -reg): DINOv2 via timm from a local file, REPA's "
                                          "target at scale; 'timm-<model>:PATH'; 'precomputed:repa_<name>': features "
                                          'stored in --data by effkernels-features',
                                          type=str, action="append", metavar="SPEC")
    repa_depth: int | None = opt(None, "align the output of block k (1-based); default from the model's depth: 4 for 12"
                                       " (S, B), 8 for 24/28 (L, XL), else round(depth/3) (tiny's 6: 2)", type=int)
    repa_weight: float = opt(0.5, 'weight of the alignment loss, at every t')
    repa_proj_dim: int | None = opt(None, 'projector hidden width; default 2048 (REPA) for width >= 384, 256 for the '
                                          'tiny CPU models', type=int)
    repa_image_key: str = opt("x", "batch array the live encoders see: 'x' (the clean data) or a per-sample extra of "
                                   "--data, e.g. 'image' (raw images stored beside VAE latents)")
    repa_value_range: str | None = opt(None, "value range of the encoder's input images (default: the data's; needed "
                                             'for pretrained encoders on .npz data, e.g. 0,255 for uint8 images)',
                                             type=str, metavar="LO,HI")


@register_method("repa")
class REPA(Method):
    """Flow loss + weight x mean over encoders of -cos(projector(h_k), encoder tokens of clean x)."""

    takes_packed_hidden = True  # align() reads a TokenPack keep index (Composite checks this)

    @staticmethod
    def add_args(group) -> None:
        add_options(group, REPAOptions)

    def __init__(self, model=None, args=None, *, encoders=None):
        """`encoders`: programmatic targets instead of --repa-encoder: a list of encoder objects
        (the protocol of effkernels.models.methods.encoders) or of (name, encoder) pairs."""
        super().__init__(model, args)
        if model is None:
            raise ConfigError("REPA needs the backbone (its width, depth and token grid) to build its projectors")
        o = read_options(REPAOptions, args)
        depth = o.repa_depth
        self.depth = default_depth(model.depth) if depth is None else int(depth)
        if not 1 <= self.depth <= model.depth:
            raise ConfigError(f"--repa-depth must lie in [1, {model.depth}] (the model's blocks), got {self.depth}")
        self.weight = float(o.repa_weight)
        if not self.weight >= 0:
            raise ConfigError(f"--repa-weight must be >= 0, got {self.weight}")
        hidden = o.repa_proj_dim
        hidden = default_proj_dim(model.hidden_size) if hidden is None else int(hidden)
        if hidden < 1:
            raise ConfigError(f"--repa-proj-dim must be >= 1, got {hidden}")
        self.image_key = o.repa_image_key
        self.value_range = _value_range(o.repa_value_range)
        self.num_tokens = model.num_patches
        grid = model.x_embedder.grid_size

        if encoders is None:
            specs = o.repa_encoder or ["dae"]
            data = read_options(TrainOptions, args).data
            built = []
            for s in specs:
                try:
                    built.append((s, enc.build_encoder(s, grid=grid, precomputed_dims=lambda k: npz_array_dim(data, k))))
                except enc.EncoderError as e:
                    raise ConfigError(f"--repa-encoder {s!r}: {e}") from None
        else:
            built = [e if isinstance(e, tuple) else (type(e).__name__, e) for e in encoders]
        if not built:
            raise ConfigError("REPA needs at least one target encoder")
        for name, e in built:
            if not hasattr(e, "encode") or not isinstance(getattr(e, "dim", None), int):
                raise ConfigError(f"REPA encoder {name!r} must have encode(images) and an int `dim`")
        self.encoders = [(n, enc.freeze(e)) for n, e in built]
        self.projectors = nn.ModuleList(AlignmentHead(model.hidden_size, e.dim, hidden=hidden, loss="cosine")
                                        for _, e in self.encoders)
        keys = [e.key for _, e in self.encoders if getattr(e, "precomputed", False)]
        live = any(not getattr(e, "precomputed", False) for _, e in self.encoders)
        self.batch_keys = tuple(dict.fromkeys(keys + ([self.image_key] if live and self.image_key != "x" else [])))

    # --- parts ---------------------------------------------------------------------------------------
    def modules(self):
        return {"repa_projectors": self.projectors}

    def attach(self, trainer) -> None:
        """Fit/load data-trained encoders on the training data, set value ranges, move to the device."""
        ds = trainer.ds
        vr = self.value_range if self.value_range is not None else getattr(ds, "value_range", None)
        for name, e in self.encoders:
            if getattr(e, "precomputed", False):
                continue
            if hasattr(e, "prepare"):
                e.prepare(ds)
            if getattr(e, "uses_value_range", False):
                if vr is None:
                    raise ConfigError(f"--repa-encoder {name!r} maps images to [0, 1] and needs their value range: "
                                      "the data has none (a .npz); give --repa-value-range LO,HI")
                e.value_range = vr
            if isinstance(e, nn.Module):
                e.to(trainer.device)

    # --- the loss ------------------------------------------------------------------------------------
    def forward_options(self, model, batch, step):
        return {"return_hidden": (self.depth,)}

    def targets(self, batch: dict) -> list[torch.Tensor]:
        """Per encoder, the target tokens (B, N, D_enc) on the DiT's grid, of the CLEAN images (no grad)."""
        out = []
        for name, e in self.encoders:
            if getattr(e, "precomputed", False):
                z = batch[e.key]
                if z.dim() != 3 or z.shape[2] != e.dim:
                    raise ConfigError(f"precomputed features {e.key!r} must be (B, N, {e.dim}), got {tuple(z.shape)}")
                out.append(enc.resample_tokens(z.detach(), self.num_tokens).contiguous())
            else:
                images = batch[self.image_key]
                if isinstance(e, nn.Module):
                    p = next(itertools.chain(e.parameters(), e.buffers()), None)
                    if p is not None and p.device != images.device:  # outside a trainer (tests, notebooks)
                        e.to(images.device)
                try:
                    out.append(enc.encode_tokens(e, images, self.num_tokens))
                except enc.EncoderError as err:
                    raise ConfigError(f"--repa-encoder {name!r}: {err}") from None
        return out

    def extra_losses(self, out, model, batch, step):
        hidden = out.get("hidden") or {}
        if self.depth not in hidden:
            raise ConfigError(f"REPA: the objective returned no hidden state at depth {self.depth}; "
                              "an objective that owns the loss must pass return_hidden through to the backbone")
        return {"repa": self.weight * self.align(hidden[self.depth], batch, out)}

    def align(self, h: torch.Tensor, batch: dict, out: dict) -> torch.Tensor:
        """Mean over encoders of the fused negative cosine between projector(h) and the targets."""
        keep_idx = (out.get("options") or {}).get("keep_idx")
        losses = []
        for head, z in zip(self.projectors, self.targets(batch)):
            if isinstance(keep_idx, TokenPack):  # per-sample budgets: h is the packed rows (T, D)
                z = keep_idx.gather(z)  # (T, D_enc), the pack's row order
                losses.append(head(h[None], z[None], token_weight=keep_idx.token_weights()[None]))
                continue
            if keep_idx is not None:  # MaskDiT: h holds the kept tokens only; take the targets at them
                z = ops.route_gather(z, keep_idx, check_idx=False)  # the backbone checked keep_idx
            losses.append(head(h, z))
        return torch.stack(losses).mean()
