"""Interop with the official DiT / SiT / REPA / LightningDiT code: load their checkpoints, patch their models.

load_official(source, model)    official state dict (DiT, SiT, REPA, LightningDiT layouts) -> our backbone, strictly
apply_effkernels(model)         swap effkernels' fused ops into an existing DiT-style model, in place

Key names. Our backbone uses the official names (x_embedder.proj.*, t_embedder.mlp.{0,2}.*,
y_embedder.embedding_table.weight, pos_embed, blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}.*, final_layer.{linear, adaLN_modulation.1}.*; norm1/norm2/norm_final have no
parameters), so the backbone's mapping is the identity once wrappers are removed: training
checkpoints nest the weights under "ema"/"model", DDP adds "module.", torch.compile "_orig_mod.".
REPA's projectors.i.{0,2,4}.* become AlignmentHead i's proj.{0,2,4}.*.

Layouts that load (anything else is an error naming the keys it does not know):
  DiT / SiT official   the keys above; final_layer.linear with C or 2C (learned sigma) outputs
  REPA                 the same plus projectors.i.{0,2,4}.* (REPA's SiT always has them)
  REPA --qk-norm       plus blocks.i.attn.{q,k}_norm.{weight,bias} (timm's LayerNorm on each head's
                       q and k): the backbone is built with qk_norm=True
  REPA legacy          decoder_blocks.j.* for the blocks after the encoder's (generate.py --legacy):
                       renamed to blocks.(encoder_depth + j).*, encoder_depth = the blocks.* present
                       unless given
  LightningDiT         hustvl/LightningDiT's (train.py's "ema"): RMSNorm weights blocks.i.norm{1,2}.weight
                       and final_layer.norm_final.weight, SwiGLU blocks.i.mlp.{w12,w3}.*, its RoPE
                       tables feat_rope.freqs_{cos,sin} (checked against ours, then dropped: ours are
                       computed), and optionally blocks.i.attn.{q,k}_norm.weight (RMSNorm QK-norm).
                       The backbone is built with norm="rmsnorm" / mlp="swiglu" / pos="sincos+rope2d"
                       as the keys say (pos_embed and feat_rope both present: both positions).

What a load means (`flavor`, recorded as `model.interop`, an Interop): "sit" (the default for a
"SiT-*" name without REPA keys): SiT's time runs the other way (t = 0 noise, t = 1 data, v = data -
noise), so the model's forward becomes v(x, t) = -sit(x, 1 - t, y) with the learned-sigma half
dropped (SiTTimeAdapter), and samplers, FlowMatching and the methods all see our convention (t = 0
data, v = noise - data). "lightningdit" (the default for a "LightningDiT-*" name): SiT's transport,
so adapted as "sit". "repa" (REPA keys present): REPA trains in our convention already; nothing
changes. "dit" (a "DiT-*" name): the network predicts DDPM noise with a learned-range variance at
integer steps 0..999; sample() then uses DDPM/DDIM (effkernels.models.objectives.ddpm). DiT, SiT and LightningDiT guide
only the first 3 channels in CFG (their forward_with_cfg), REPA guides all: `interop.guided_channels`
(3 or None) is what sample(guided_channels="auto") follows.
"""
from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from effkernels.nn import AlignmentHead
from effkernels.nn._common import check_backend
from effkernels.reference.rope import grid_positions, rope2d_angles

from ..backbone.configs import LIGHTNING_SIZES, SIZES, build
from ..backbone.network import DiT

_WRAPPER_KEYS = ("ema", "model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
_PROJ = re.compile(r"^projectors\.(\d+)\.(.+)$")
_LEGACY = re.compile(r"^decoder_blocks\.(\d+)\.(.+)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_KNOWN = re.compile(
    r"^(?:x_embedder\.proj|t_embedder\.mlp\.[02]|final_layer\.(?:linear|adaLN_modulation\.1)"
    r"|blocks\.\d+\.(?:attn\.(?:qkv|proj|q_norm|k_norm)|mlp\.(?:fc[12]|w12|w3)|adaLN_modulation\.1))\.(?:weight|bias)$"
    r"|^(?:blocks\.\d+\.norm[12]|final_layer\.norm_final)\.weight$"
    r"|^y_embedder\.embedding_table\.weight$|^pos_embed$")
_ROPE_TABLES = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
LAYOUTS = ("DiT/SiT official", "REPA (projectors.*)", "REPA --qk-norm (blocks.i.attn.{q,k}_norm.{weight,bias})",
           "REPA legacy (decoder_blocks.j.* after the encoder's blocks.*)",
           "LightningDiT (RMSNorm norm*.weight, SwiGLU mlp.{w12,w3}, feat_rope.freqs_{cos,sin})")
FLAVORS = ("dit", "sit", "repa", "lightningdit")


@dataclass(frozen=True)
class Interop:
    """What an official checkpoint's network means, recorded by load_official as `model.interop`.

    flavor: "dit", "sit" or "repa". prediction: "eps" (DDPM noise, integer steps 0..999, DiT) or
    "velocity" (our convention: t = 0 data, t = 1 noise, v = noise - data; a SiT checkpoint is
    adapted to it). time: the convention the checkpoint was trained in. guided_channels: the
    channels the paper's CFG guides (3 for DiT and SiT, None = all for REPA). layout: the key layout
    that was read (one of LAYOUTS). sigma_dropped: a learned-sigma half is ignored (SiT semantics).
    """
    flavor: str
    prediction: str
    time: str
    guided_channels: int | None
    layout: str
    sigma_dropped: bool = False


def _interop(flavor: str, layout: str, learn_sigma: bool) -> Interop:
    if flavor == "dit":
        return Interop("dit", "eps", "DDPM steps 0..999 (0 = least noise)", 3, layout)
    if flavor == "lightningdit":
        return Interop("lightningdit", "velocity", "SiT's (LightningDiT's transport): t = 0 noise, t = 1 data, "
                       "v = data - noise; adapted: v(x, t) = -net(x, 1 - t, y)", 3, layout, sigma_dropped=learn_sigma)
    if flavor == "sit":
        return Interop("sit", "velocity", "SiT: t = 0 noise, t = 1 data, v = data - noise; adapted: "
                       "v(x, t) = -sit(x, 1 - t, y)", 3, layout, sigma_dropped=learn_sigma)
    return Interop("repa", "velocity", "REPA = ours: t = 0 data, t = 1 noise, v = noise - data", None, layout)


class SiTTimeAdapter(DiT):
    """An official SiT network in our convention: forward(x, t, y) = -sit(x, 1 - t, y)[:, :C].

    SiT integrates from t = 0 (noise) to 1 (data) with v = data - noise; ours from t = 1 (noise) to 0
    with v = noise - data, so the same path at our t is SiT's at 1 - t with the velocity negated. The
    learned-sigma half of a SiT checkpoint is dropped, as SiT's own forward does. Parameters, hidden
    states and every forward option are the DiT's; load_official sets this class on the loaded model.
    """

    def forward(self, x, t, y=None, **kwargs):
        res = super().forward(x, 1 - torch.as_tensor(t, device=x.device), y, **kwargs)
        out, hidden = res if isinstance(res, tuple) else (res, None)
        if out is not None:
            c = self.in_channels
            if out.dim() == 3:  # keep_idx: tokens (B, K, p*p*C_out), channels innermost
                p2 = self.patch_size ** 2
                out = out.reshape(*out.shape[:2], p2, -1)[..., :c].reshape(*out.shape[:2], p2 * c)
            else:
                out = out[:, :c]
            out = -out
        return (out, hidden) if isinstance(res, tuple) else out


def normalize_layout(sd: Mapping[str, torch.Tensor], *, encoder_depth: int | None = None,
                     what: str = "the state dict") -> tuple[dict, str]:
    """(backbone keys in our layout, the layout's name): REPA's legacy decoder_blocks renamed; keys
    of no known layout are an error that names them."""
    legacy = {int(m.group(1)): None for k in sd if (m := _LEGACY.match(k))}
    out, layout = {k: v for k, v in sd.items() if k not in _ROPE_TABLES}, LAYOUTS[0]
    if legacy:
        if encoder_depth is None:
            encoder_depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
        out = {}
        for k, v in sd.items():
            m = _LEGACY.match(k)
            name = f"blocks.{encoder_depth + int(m.group(1))}.{m.group(2)}" if m else k
            if name in out:
                raise ValueError(f"{what}: {k!r} renamed by encoder_depth={encoder_depth} collides with {name!r}")
            out[name] = v
        layout = LAYOUTS[3]
    elif encoder_depth is not None:
        raise ValueError(f"encoder_depth is for REPA's legacy decoder_blocks layout; {what} has no decoder_blocks keys")
    unknown = sorted(k for k in out if not _KNOWN.match(k))
    if unknown:
        raise ValueError(f"{what} has keys of no layout that loads: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}; layouts that load: {'; '.join(LAYOUTS)}")
    if _is_lightningdit(sd):
        layout = LAYOUTS[4]
    elif any(".attn.q_norm." in k or ".attn.k_norm." in k for k in out) and not legacy:
        layout = LAYOUTS[2]
    return out, layout


def _is_lightningdit(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k in sd for k in _ROPE_TABLES) or "blocks.0.norm1.weight" in sd or "blocks.0.mlp.w12.weight" in sd


def check_rope_tables(sd: Mapping[str, torch.Tensor], model: DiT, what: str) -> None:
    """A LightningDiT checkpoint's stored RoPE tables (feat_rope.freqs_{cos,sin}, (N, Dh), each pair's
    angle repeated twice) must be the angles our rotary op computes for the model's grid: a
    checkpoint trained with other frequencies or another grid is an error, not a silent mismatch."""
    if not any(k in sd for k in _ROPE_TABLES):
        return
    if not model.uses_rope:
        raise ValueError(f"{what} stores RoPE tables (feat_rope.*) but the model has pos={model.pos_kind!r}")
    g = model.x_embedder.grid_size
    ang = rope2d_angles(grid_positions(g, g), model.hidden_size // model.num_heads, 10000.0, torch.float64)
    for k, fn in zip(_ROPE_TABLES, (torch.cos, torch.sin)):
        if k not in sd:
            raise ValueError(f"{what} has {_ROPE_TABLES[0]} or {_ROPE_TABLES[1]} but not both")
        want = fn(ang).repeat_interleave(2, -1)
        got = sd[k].double()
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5):
            raise ValueError(f"{what}: {k} {tuple(got.shape)} is not the 2-D axial RoPE table of a {g}x{g} grid "
                             f"with head dim {model.hidden_size // model.num_heads} and theta 10000 (ours "
                             f"{tuple(want.shape)})")


#################################################################################
#                              Reading checkpoints                              #
#################################################################################

def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(source, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a checkpoint file path or an in-memory dict.

    Files are read with torch.load(weights_only=True) onto the CPU, with argparse.Namespace allowed:
    the official DiT/SiT/REPA training scripts store their command line as one ("args"). For a file
    holding other objects, load it yourself if you trust it and pass the dict. A training checkpoint's weights
    are taken from `key` if given, else the first of "ema", "model", "state_dict", "module" present
    (EMA weights are the ones the papers sample from). "module." / "_orig_mod." prefixes are removed.
    """
    name = "the given dict"
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"checkpoint file {name!r} does not exist or is not a file")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"checkpoint file {name!r} is not a PyTorch checkpoint that torch.load(weights_only=True) "
                             f"can read ({type(e).__name__}: {first}); if you trust it, torch.load it yourself and "
                             "pass the dict") from e
    elif isinstance(source, Mapping):
        obj = source
    else:
        raise TypeError(f"source must be a file path or a dict, got {type(source).__name__}")

    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise ValueError(f"{name} has no entry {key!r}")
        obj = obj[key]
    elif not _is_state_dict(obj) and isinstance(obj, Mapping):
        for k in _WRAPPER_KEYS:
            if k in obj and _is_state_dict(obj[k]):
                obj = obj[k]
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{name} holds no state dict of tensors (top level: {keys}); pass key= to pick one")
    out = {}
    for k, v in obj.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def split_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict, list[dict]]:
    """(backbone entries, [REPA projector i's entries renamed to AlignmentHead's proj.*])."""
    backbone, heads = {}, {}
    for k, v in sd.items():
        m = _PROJ.match(k)
        if m:
            heads.setdefault(int(m.group(1)), {})["proj." + m.group(2)] = v
        else:
            backbone[k] = v
    if heads and sorted(heads) != list(range(len(heads))):
        raise ValueError(f"projector indices must be 0..{len(heads) - 1}, got {sorted(heads)}")
    return backbone, [heads[i] for i in range(len(heads))]


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """DiT constructor arguments implied by an official state dict's shapes (all but num_heads).

    An embedding table of R rows is read as R - 1 classes plus the null class (every official model
    trained with label dropout 0.1); pass num_classes/class_dropout_prob to load_official otherwise.
    """
    need = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not a DiT/SiT state dict: missing {missing}")
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    n = sd["pos_embed"].shape[1]
    grid = round(n ** 0.5)
    if grid * grid != n:
        raise ValueError(f"pos_embed has {n} tokens, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))), default=-1)
    out = sd["final_layer.linear.weight"].shape[0]
    if out not in (p * p * C, 2 * p * p * C):
        raise ValueError(f"final_layer.linear has {out} outputs; expected {p * p * C} or {2 * p * p * C}")
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:  # hidden = int(2/3 * int(D * ratio)): the paper's ratio 4 when it fits, else the nearest
        hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        mlp_ratio = 4.0 if int(2 / 3 * int(D * 4.0)) == hidden else 1.5 * hidden / D
    else:
        mlp_ratio = (sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * D) / D
    rms = "blocks.0.norm1.weight" in sd
    qk = any(".attn.q_norm." in k for k in sd)
    qk_norm = ("rmsnorm" if not any(".attn.q_norm.bias" in k for k in sd) else "layernorm") if qk and rms else qk
    pos = "sincos+rope2d" if any(k in sd for k in _ROPE_TABLES) else "sincos"
    return dict(input_size=grid * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth,
                mlp_ratio=mlp_ratio, num_classes=rows - 1, class_dropout_prob=0.1,
                learn_sigma=out == 2 * p * p * C, qk_norm=qk_norm, norm="rmsnorm" if rms else "layernorm",
                mlp="swiglu" if swiglu else "gelu", pos=pos)


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    # Our own check rather than load_state_dict's RuntimeError: it names the source and lists the
    # offending keys, including qk-norm weights (REPA's --qk-norm) the backbone does not have.
    ours = module.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}"
              for k in sorted(set(sd) & set(ours)) if sd[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}, "
                         f"shape mismatches {shapes[:10]}")
    module.load_state_dict(sd, strict=True)


#################################################################################
#                               Loading checkpoints                             #
#################################################################################

def load_official(source, model: DiT | str | None = None, *, key: str | None = None,
                  num_heads: int | None = None, return_projectors: bool = False,
                  projector_loss: str = "cosine", backend: str | None = None, flavor: str | None = None,
                  encoder_depth: int | None = None, **overrides):
    """Load an official DiT / SiT / REPA checkpoint into our backbone, every parameter strictly.

    source: a checkpoint path or a dict (see read_state_dict); the layouts that load are listed in
        the module docstring (REPA's --qk-norm and legacy decoder_blocks included).
    model: a DiT to fill; a config name ("SiT-XL/2") built with the checkpoint's input size, channels,
        classes, learn_sigma and qk_norm (overrides win); or None to build from the checkpoint's shapes alone
        (num_heads is not stored: pass it, or the S/B/L/XL head count of its width is used).
    flavor: "sit", "repa", "dit" or None (default: "repa" when REPA's keys are present, else "dit" /
        "sit" from a "DiT-*" / "SiT-*" name, else none: the network is loaded as it is, no interop).
        "sit" makes the model a SiTTimeAdapter (our time convention, sigma half dropped); every
        flavor is recorded as `model.interop` (an Interop), which the samplers read.
    encoder_depth: REPA legacy checkpoints: the blocks before decoder_blocks.0 (default: the count
        of blocks.* keys).
    return_projectors: also return REPA's projectors as a ModuleList of AlignmentHead (empty when
        the checkpoint has none); otherwise projector weights, training-only heads, are not loaded.
    Returns the model, or (model, heads).
    """
    check_backend(backend)
    if flavor is not None and flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS} or None, got {flavor!r}")
    sd = read_state_dict(source, key=key)
    what = f"checkpoint {os.fspath(source)!r}" if isinstance(source, (str, os.PathLike)) else "the given state dict"
    backbone, heads_sd = split_state_dict(sd)
    backbone, layout = normalize_layout(backbone, encoder_depth=encoder_depth, what=what)
    if flavor is None:
        if layout == LAYOUTS[4] or isinstance(model, str) and model.startswith("LightningDiT-"):
            flavor = "lightningdit"
        elif heads_sd or layout != LAYOUTS[0]:
            flavor = "repa"
        elif isinstance(model, str) and model.startswith("DiT-"):
            flavor = "dit"
        elif isinstance(model, str) and model.startswith("SiT-"):
            flavor = "sit"
    if heads_sd and layout == LAYOUTS[0]:
        layout = LAYOUTS[1]
    if model is None or isinstance(model, str):
        cfg = infer_config({**backbone, **{k: sd[k] for k in _ROPE_TABLES if k in sd}})
        if model is None:
            width = cfg["hidden_size"]
            n_heads = num_heads or next((h for _, (_, w, h) in (*SIZES.items(), *LIGHTNING_SIZES.items())
                                         if w == width), None)
            if n_heads is None:
                raise ValueError(f"width {width} is not a standard size: pass num_heads")
            cfg["num_heads"] = n_heads
            model = DiT(**{**cfg, **overrides, "backend": backend})
        else:
            # The named config fixes the architecture; the checkpoint supplies the data-dependent sizes.
            for k in ("hidden_size", "depth", "patch_size", "mlp_ratio", "norm", "mlp", "pos"):
                cfg.pop(k)
            heads = {} if num_heads is None else {"num_heads": num_heads}
            model = build(model, **{**cfg, **heads, **overrides, "backend": backend})
    elif not isinstance(model, DiT):
        raise TypeError(f"model must be a DiT, a config name or None, got {type(model).__name__}")
    elif overrides:
        raise ValueError(f"constructor overrides {sorted(overrides)} need model=None or a config name, not a built DiT")
    check_rope_tables(sd, model, what)
    _load_strict(model, backbone, what)
    if flavor == "dit" and not model.learn_sigma:
        raise ValueError(f"{what}: a DiT checkpoint predicts a learned variance (2C outputs); this one has "
                         f"{model.out_channels}")
    if flavor in ("sit", "lightningdit"):
        # same parameters and buffers, our time convention (a subclass: state_dict keys unchanged)
        model.__class__ = SiTTimeAdapter
    if flavor is not None:
        model.interop = _interop(flavor, layout, model.learn_sigma)
    if not return_projectors:
        return model
    heads = nn.ModuleList()
    for i, hsd in enumerate(heads_sd):
        if not all(f"proj.{j}.weight" in hsd for j in (0, 2, 4)):
            raise ValueError(f"{what}: projectors.{i} is not a Linear-SiLU-Linear-SiLU-Linear projector")
        d_hidden, dim = hsd["proj.0.weight"].shape
        z_dim = hsd["proj.4.weight"].shape[0]
        head = AlignmentHead(dim, z_dim, hidden=d_hidden, loss=projector_loss, backend=backend)
        _load_strict(head, hsd, f"{what} projectors.{i}")
        heads.append(head)
    return model, heads


#################################################################################
#                    Patching an existing DiT-style model in place              #
#################################################################################


