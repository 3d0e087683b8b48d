"""The `effkernels-train` command line: the trainer's flags, their checks, and main()."""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys

import torch

import effkernels
from effkernels.backends import BACKENDS

from .. import ddp
from ..backbone.configs import CONFIGS
from ..backbone.network import DiT
from ..checkpoint import CheckpointError
from ..data.sources import DataError
from ..methods import METHODS, ConfigError, add_method_args, parse_spec
from ..train.batches import SHUFFLES
from ..train.trainer import Trainer
from .args import check_backend_arg
from .presets import add_preset_arg, announce, apply_preset, missing_requirements


def parse_betas(text: str) -> tuple[float, float]:
    """'B1,B2' -> (B1, B2), each in [0, 1) (argparse type of --adam-betas)."""
    try:
        b = tuple(float(v) for v in text.split(","))
    except ValueError:
        b = ()
    if len(b) != 2 or not all(0.0 <= v < 1.0 for v in b):
        raise argparse.ArgumentTypeError(f"expected two numbers in [0, 1) as B1,B2 (e.g. 0,0.99), got {text!r}")
    return b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effkernels-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default=None,
                   help="training method, or several joined by '+' (e.g. tread+repa); see --list-methods "
                        "(default: dit, DiT's DDPM objective, for DiT-* models, else sit)")
    p.add_argument("--model", default="tiny/2", help="backbone config name, e.g. tiny/2, SiT-B/2")
    p.add_argument("--data", default="digits",
                   help="'digits', an image folder, a .npz/.npy latent file, or a fast-DiT (features/ + labels/) "
                        "or REPA (vae-sd/ [+ images/]) latent folder, read per sample")
    p.add_argument("--shuffle", default="replacement", choices=SHUFFLES,
                   help="batches drawn with replacement, or a permutation each epoch (the official loaders)")
    p.add_argument("--hflip", action="store_true", help="mirror each sample with p = 1/2 (DiT's horizontal flip)")
    p.add_argument("--data-workers", type=int, default=4,
                   help="processes reading latent folders (0: read in the training process)")
    add_preset_arg(p)
    p.add_argument("--out", default="runs/digits", help="output folder (checkpoints, logs, grids, curves)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (a resumed run continues to it)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--adam-betas", type=parse_betas, default=None, metavar="B1,B2",
                   help="the generator AdamW's betas; default (0.9, 0.999), or what the method needs (ct, act: "
                        "0,0.99 as ACT's release); applied also after a resume")
    p.add_argument("--warmup", type=int, default=100, help="linear lr warm-up steps (0: none)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (with warm-up, see --ema-no-warmup)")
    p.add_argument("--ema-no-warmup", action="store_true", help="constant EMA decay from step 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' for <out>/last.pt if present")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations (0: never)")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--eval-steps", type=int, default=10, help="Heun steps of the evaluation sampler")
    p.add_argument("--ckpt-every", type=int, default=250, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of backbone overrides, e.g. '{\"depth\": 4}'")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--list-methods", action="store_true")
    add_method_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    preset, installed = apply_preset(p, argv)  # the preset's values become defaults: flags still win
    a = p.parse_args(argv)
    a.preset_line = announce(preset, a, installed, "effkernels-train")
    if a.list_methods:
        print("\n".join(sorted(METHODS)))
        raise SystemExit(0)
    if a.method is None:  # DiT-* configs predict noise and a variance: DiT's objective trains them
        a.method = "dit" if a.model.startswith("DiT-") else "sit"
    try:
        parse_spec(a.method)
    except ConfigError as e:
        p.error(f"--{e}")  # "--method 'x' is not registered; known: ..."
    missing = missing_requirements(preset, a)
    if missing:
        p.error(f"--preset {preset.name} needs {'; '.join(missing)}")
    if a.model not in CONFIGS:
        p.error(f"--model {a.model!r} is unknown; known: {', '.join(CONFIGS)}")
    for name in ("steps", "batch_size", "eval_samples", "eval_steps", "log_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("eval_every", "ckpt_every", "warmup", "threads", "data_workers"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        p.error(f"--lr must be a positive number, got {a.lr}")
    if not (0.0 <= a.ema < 1.0):
        p.error(f"--ema must lie in [0, 1), got {a.ema}")
    if not a.grad_clip >= 0:
        p.error(f"--grad-clip must be >= 0 (0: no clipping), got {a.grad_clip}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device} but no CUDA device is available")
    check_backend_arg(p, a.backend, a.device)
    try:
        a.model_kwargs = json.loads(a.model_kwargs)
        assert isinstance(a.model_kwargs, dict)
    except (ValueError, AssertionError):
        p.error(f"--model-kwargs must be a JSON object, got {a.model_kwargs!r}")
    known = [k for k in inspect.signature(DiT.__init__).parameters if k != "self"]
    unknown = sorted(set(a.model_kwargs) - set(known))
    if unknown:
        p.error(f"--model-kwargs: unknown backbone option(s) {unknown}; known: {', '.join(known)}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out!r} is an existing file, not a folder")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch_size % world:
        p.error(f"--batch-size {a.batch_size} is not divisible by WORLD_SIZE={world}")
    if a.resume and a.resume != "auto" and not os.path.isfile(a.resume):
        p.error(f"--resume {a.resume!r}: no such checkpoint file")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        with effkernels.use_backend(a.backend):
            trainer = Trainer(a)
            res = trainer.run()
    except (DataError, CheckpointError, ConfigError, FloatingPointError) as e:
        print(f"effkernels-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        ddp.shutdown()
    if trainer.dist.is_main:
        show = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
        print("final: " + json.dumps(show))
    return 0


if __name__ == "__main__":
    sys.exit(main())
