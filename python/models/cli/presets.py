"""Paper presets: the training and sampling defaults of each method's paper run, named.

    effkernels-train --preset repa --model SiT-XL/2 --data /data/imagenet256 ...   # REPA's recipe
    effkernels-train --preset sit --lr 2e-4 ...                                    # a flag still wins
    effkernels-sample --preset repa --ckpt ... --out ...                            # REPA's sampler

A preset replaces the parser's defaults (gpt-fast's dataclass configs with `from_name`), so every
flag given on the command line still overrides it; the trainer prints the preset and the overrides
at start. What the papers' code does (facebookresearch/DiT train.py, willisma/SiT train.py,
sihyun-yu/REPA train.py and its README's commands):
  all three    AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0, no lr warm-up, global batch 256,
               EMA 0.9999 started as a copy of the initial weights (no decay warm-up), a permutation
               of the data set each epoch (DistributedSampler shuffle=True, drop_last), label dropout
               0.1 (the model's default), 400K steps for the papers' comparison tables, a checkpoint
               every 50K steps, a log line every 100.
  grad clip    none for DiT and SiT (they never clip); 1.0 for REPA (max_grad_norm).
  flip         DiT and SiT flip images horizontally (RandomHorizontalFlip) before the VAE; REPA's
               pre-computed latents are not flipped.
  method       repa for REPA (alignment weight 0.5, depth 8 for 24/28-block models: the method's
               defaults); the objective of DiT/SiT follows from the model name.
  sampling     DiT: 250 DDPM steps, cfg 1.5 on the first 3 channels (its FID 2.27); SiT: 250-step SDE
               (Euler-Maruyama), cfg 1.5 (2.06); REPA: 250-step SDE, cfg 1.8 on t in [0, 0.7] (1.42).
The methods built on them (the method's own options are its defaults unless listed):
  tread        SiT's settings (TREAD trains on the DiT/SiT code base) with the method tread.
  maskdit      Anima-Lab/MaskDiT configs/train/imagenet256-latent.yaml: lr 1e-4, global batch 1024
               (128 per GPU x 8), no clipping, flipped latents, mask ratio 0.5, MAE weight 0.1, 2M steps;
               EMA 0.9999 from step 0 as DiT's.
  erw          REPA's settings with the method erw (warm-up 100K steps, c0 by model size).
  sra          SiT's settings with REPA's clipping 1.0 (SRA's release is built on REPA's trainer); the
               EMA is SRA's teacher, 0.9999 from step 0.
  ct, act      kong13661/ACT train_imagenet64.py: generator and discriminator lr 5e-5, betas (0, 0.99)
               (the methods' own), a global batch of 640 split into a generator and a discriminator half
               (its 320 per half on one device), no clipping, no warm-up, 400K steps, N(k) from 2 to 200,
               target decay mu0 0.95, LPIPS distance (needs --lpips-vgg); act: lambda 0.6 t-weighted with
               mid 0.2. Sampling: one step (the methods' sampler).
A preset that needs a file the run cannot make up (REPA's and ERW's pretrained encoder, LPIPS's VGG
weights) makes that flag required: without it the run is a clear error, never a CPU demo stand-in.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """One paper's defaults; field names are the trainer's / sampler's option names (dest)."""

    name: str
    paper: str
    # --- training (effkernels-train) ---
    lr: float = 1e-4
    warmup: int = 0
    batch_size: int = 256
    ema: float = 0.9999
    ema_no_warmup: bool = True  # the EMA starts as a copy and decays at 0.9999 from step 0
    grad_clip: float = 0.0  # 0: no clipping
    shuffle: str = "epoch"
    hflip: bool = False
    steps: int = 400_000
    ckpt_every: int = 50_000
    log_every: int = 100
    method: str | None = None  # None: keep the parser's (or the user's) method
    options: tuple = ()  # (dest, value) pairs of the method's own options
    requires: tuple = ()  # (dest, what it is[, (dest, value) while which it is needed]): options to give
    # --- sampling (effkernels-sample) ---
    sampler: str = "euler-maruyama"
    sample_steps: int = 250
    cfg_scale: float = 1.5
    guidance_low: float = 0.0
    guidance_high: float = 1.0

    TRAIN = ("lr", "warmup", "batch_size", "ema", "ema_no_warmup", "grad_clip", "shuffle", "hflip", "steps",
             "ckpt_every", "log_every", "method")
    SAMPLE = ("sampler", "sample_steps", "cfg_scale", "guidance_low", "guidance_high")

    @classmethod
    def from_name(cls, name: str) -> Preset:
        if name not in PRESETS:
            raise ValueError(f"preset {name!r} is unknown; known: {', '.join(PRESETS)}")
        return PRESETS[name]

    def train_defaults(self) -> dict:
        d = {k: getattr(self, k) for k in self.TRAIN}
        return {**{k: v for k, v in d.items() if v is not None}, **dict(self.options)}

    def sample_defaults(self) -> dict:
        d = {k: getattr(self, k) for k in self.SAMPLE}
        d["steps"] = d.pop("sample_steps")  # effkernels-sample's --steps
        return d


_ENCODER = ("repa_encoder", "--repa-encoder SPEC (the pretrained target encoder, e.g. dinov2-vitb14:/path/weights.pth)")
_VGG = ("lpips_vgg", "--lpips-vgg PATH (a local VGG16 weights file for the LPIPS distance)", ("ct_distance", "lpips"))
_ACT64 = dict(lr=5e-5, batch_size=640, ema=0.9999, grad_clip=0.0, hflip=False, sample_steps=1, cfg_scale=1.0,
              requires=(_VGG,))
_ACT64_CT = (("ct_s1", 200), ("ct_mu0", 0.95), ("ct_distance", "lpips"))

PRESETS = {
    "dit": Preset("dit", "DiT (Peebles & Xie 2023)", hflip=True, sampler="ddpm"),
    "sit": Preset("sit", "SiT (Ma et al. 2024)", hflip=True),
    "repa": Preset("repa", "REPA (Yu et al. 2025)", grad_clip=1.0, method="repa", cfg_scale=1.8,
                   guidance_high=0.7, requires=(_ENCODER,)),
    "tread": Preset("tread", "TREAD (Krause et al. 2025)", hflip=True, method="tread"),
    "maskdit": Preset("maskdit", "MaskDiT (Zheng et al. 2024)", batch_size=1024, hflip=True, steps=2_000_000,
                      method="maskdit", options=(("mask_ratio", 0.5), ("mae_weight", 0.1))),
    "erw": Preset("erw", "ERW (Liu et al. 2025)", grad_clip=1.0, method="erw", cfg_scale=1.8, guidance_high=0.7,
                  options=(("erw_warmup_steps", 100_000),), requires=(_ENCODER,)),
    "sra": Preset("sra", "SRA (Jiang et al. 2025)", grad_clip=1.0, hflip=False, method="sra"),
    "ct": Preset("ct", "ACT's consistency training (Kong et al. 2024)", method="ct", options=_ACT64_CT, **_ACT64),
    "act": Preset("act", "ACT (Kong et al. 2024), ImageNet64", method="act", **_ACT64,
                  options=(*_ACT64_CT, ("act_lambda", 0.6), ("act_lambda_schedule", "t-weighted"),
                           ("act_lambda_mid", 0.2), ("act_d_lr", 5e-5))),
}


# -----------------------------------------------------------------------------------------------
# Applying a preset to a parser
# -----------------------------------------------------------------------------------------------


def add_preset_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="a paper's defaults (see effkernels.models.cli.presets); explicit flags override them")


def apply_preset(parser: argparse.ArgumentParser, argv, kind: str = "train") -> tuple[Preset | None, dict]:
    """Find --preset in argv and install its defaults into `parser` (only options the parser has; a
    sampler the parser does not offer is left out). Returns (preset or None, the defaults installed)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is None:
        return None, {}
    if known.preset not in PRESETS:
        parser.error(f"--preset {known.preset!r} is unknown; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[known.preset]
    want = preset.train_defaults() if kind == "train" else preset.sample_defaults()
    actions = {a.dest: a for a in parser._actions}
    installed = {}
    for k, v in want.items():
        act = actions.get(k)
        if act is None or (act.choices is not None and v not in act.choices):
            continue
        installed[k] = v
    parser.set_defaults(**installed)
    return preset, installed


def overrides(args: argparse.Namespace, installed: dict) -> dict:
    """The preset's settings that flags changed: {name: (preset value, value used)}."""
    return {k: (v, getattr(args, k)) for k, v in installed.items() if getattr(args, k) != v}


def missing_requirements(preset: Preset | None, args: argparse.Namespace) -> list[str]:
    """The preset's required options that `args` (effkernels-train's, method resolved) leaves unset, each as "--flag VALUE (what it is)". None
    while the run does not use the preset's method (a flag chose another), or the option that needs it
    was changed by a flag."""
    if preset is None or (preset.method and preset.method not in args.method.split("+")):
        return []
    out = []
    for dest, what, *when in preset.requires:
        if when and getattr(args, when[0][0], None) != when[0][1]:
            continue
        if getattr(args, dest, None) in (None, []):
            out.append(what)
    return out


def announce(preset: Preset | None, args: argparse.Namespace, installed: dict, prog: str) -> str | None:
    """The start-up line: the preset's settings and what flags overrode (printed by rank 0 only)."""
    if preset is None:
        return None
    ov = overrides(args, installed)
    line = (f"{prog}: preset {preset.name} ({preset.paper}): "
            + ", ".join(f"{k}={v}" for k, v in installed.items())
            + (f"; overridden by flags: {', '.join(f'{k}={b} (preset {a})' for k, (a, b) in ov.items())}" if ov else ""))
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)
    return line

