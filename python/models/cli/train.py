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

from .. import ddp
from ..backbone.configs import CONFIGS
from ..backbone.network import DiT
from ..checkpoint import CheckpointError
from ..data.sources import DataError
from ..methods import METHODS, ConfigError, add_method_args, parse_spec
from ..options import TrainOptions, add_options
from ..train.trainer import Trainer
from .args import check_backend_arg
from .presets import add_preset_arg, announce, apply_preset, missing_requirements


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effkernels-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_options(p, TrainOptions)
    add_preset_arg(p)
    p.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
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
