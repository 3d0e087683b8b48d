"""Paper presets: the training and sampling defaults of DiT, SiT and REPA's ImageNet 256 runs, named.

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
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields


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
        return {k: v for k, v in d.items() if v is not None}

    def sample_defaults(self) -> dict:
        d = {k: getattr(self, k) for k in self.SAMPLE}
        d["steps"] = d.pop("sample_steps")  # effkernels-sample's --steps
        return d

    def describe(self) -> str:
        skip = {"name", "paper"}
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name not in skip)


PRESETS = {
    "dit": Preset("dit", "DiT (Peebles & Xie 2023)", hflip=True, sampler="ddpm"),
    "sit": Preset("sit", "SiT (Ma et al. 2024)", hflip=True),
    "repa": Preset("repa", "REPA (Yu et al. 2025)", grad_clip=1.0, method="repa", cfg_scale=1.8,
                   guidance_high=0.7),
}


# -----------------------------------------------------------------------------------------------
# Applying a preset to a parser
# -----------------------------------------------------------------------------------------------


def add_preset_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="a paper's defaults (see effkernels.models.presets); explicit flags override them")


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


def as_dict(preset: Preset) -> dict:
    return asdict(preset)
