"""Options, each declared once: the trainer's (TrainOptions, below) and every method's, each a dataclass whose field names are the argparse dests and whose
metadata carries the flag's help (and type, choices, action). From it come the argparse group
(`add_options`), the defaults, and the values a method reads from parsed arguments, a checkpoint's
options or a test's partial Namespace (`read_options`: a missing name takes the field's default).

    @dataclass
    class SRAOptions:
        sra_t_max: float = opt(0.2, "the teacher's t is t - t_max U(0, 1)")

    group.add_argument("--sra-t-max", type=float, default=0.2, help=...)   # what add_options does
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

import torch

from effkernels.backends import BACKENDS


def opt(default, help: str, *, type=None, choices=None, action=None, metavar=None):
    """A field of an options dataclass: its default and its CLI flag's help. `type` is needed when
    the default is None (argparse cannot infer it); `action` "store_true" for a bool flag that is off
    by default, "append" for a repeatable flag (default None: not given)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("opt: a mutable default would be shared between instances; use None")
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "action": action,
                                            "metavar": metavar})


def flag_of(name: str) -> str:
    """The CLI flag of a dest: sra_t_max -> --sra-t-max."""
    return "--" + name.replace("_", "-")


def add_options(group, cls) -> None:
    """One argparse argument per field of `cls`, its default the field's."""
    for f in fields(cls):
        m = f.metadata
        kw = {"default": f.default, "help": m["help"], "dest": f.name}
        action = m["action"]
        if action == "store_true":
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a store_true flag defaults to False")
            kw["action"] = "store_true"
        else:
            if action:
                kw["action"] = action
            typ = m["type"] or (type(f.default) if f.default is not None else None)
            if typ is None:
                raise TypeError(f"{cls.__name__}.{f.name}: give type= for a None default")
            if typ is not str:
                kw["type"] = typ
            if m["choices"] is not None:
                kw["choices"] = m["choices"]
            if m["metavar"] is not None:
                kw["metavar"] = m["metavar"]
        group.add_argument(flag_of(f.name), **kw)


def read_options(cls, args: argparse.Namespace | None):
    """`cls` filled from `args` (parsed flags, a checkpoint's options, a test's partial Namespace, or
    None): each field from the attribute of its name, else its default."""
    vals = {}
    for f in fields(cls):
        if f.default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: every option needs a default")
        vals[f.name] = getattr(args, f.name, f.default) if args is not None else f.default
    return cls(**vals)


def parse_betas(text: str) -> tuple[float, float]:
    """'B1,B2' -> (B1, B2), each in [0, 1) (argparse type of --adam-betas)."""
    try:
        b = tuple(float(v) for v in text.split(","))
    except ValueError:
        b = ()
    if len(b) != 2 or not all(0.0 <= v < 1.0 for v in b):
        raise argparse.ArgumentTypeError(f"expected two numbers in [0, 1) as B1,B2 (e.g. 0,0.99), got {text!r}")
    return b


SHUFFLES = ("replacement", "epoch")


@dataclass
class TrainOptions:
    """The trainer's options (effkernels-train's flags besides --preset, --list-methods and the
    methods' own). The trainer, and a method that needs one of them (the run's seed, length or
    data), read them with read_options(TrainOptions, args)."""
    method: str | None = opt(None, "training method, or several joined by '+' (e.g. tread+repa); see "
                             "--list-methods (default: dit, DiT's DDPM objective, for DiT-* models, else sit)", type=str)
    model: str = opt("tiny/2", "backbone config name, e.g. tiny/2, SiT-B/2")
    data: str = opt("digits", "'digits', an image folder, a .npz/.npy latent file, or a fast-DiT (features/ + labels/) "
                    "or REPA (vae-sd/ [+ images/]) latent folder, read per sample")
    shuffle: str = opt("replacement", "batches drawn with replacement, or a permutation each epoch (the official "
                       "loaders)", choices=SHUFFLES)
    hflip: bool = opt(False, "mirror each sample with p = 1/2 (DiT's horizontal flip)", action="store_true")
    data_workers: int = opt(4, "processes reading latent folders (0: read in the training process)")
    out: str = opt("runs/digits", "output folder (checkpoints, logs, grids, curves)")
    steps: int = opt(1000, "total optimizer steps (a resumed run continues to it)")
    batch_size: int = opt(64, "global batch, split over processes")
    lr: float = opt(2e-3, "AdamW learning rate (after the warm-up)")
    adam_betas: tuple | None = opt(None, "the generator AdamW's betas; default (0.9, 0.999), or what the method "
                                   "needs (ct, act: 0,0.99 as ACT's release); applied also after a resume",
                                   type=parse_betas, metavar="B1,B2")
    warmup: int = opt(100, "linear lr warm-up steps (0: none)")
    grad_clip: float = opt(1.0, "max gradient norm (0: no clipping)")
    ema: float = opt(0.999, "EMA decay (with warm-up, see --ema-no-warmup)")
    ema_no_warmup: bool = opt(False, "constant EMA decay from step 0", action="store_true")
    seed: int = opt(0, "the run's seed: initial weights, batches, noise")
    resume: str | None = opt(None, "checkpoint to resume from, or 'auto' for <out>/last.pt if present", type=str)
    eval_every: int = opt(250, "steps between evaluations (0: never)")
    eval_samples: int = opt(500, "samples drawn for each evaluation")
    eval_steps: int = opt(10, "Heun steps of the evaluation sampler")
    ckpt_every: int = opt(250, "steps between checkpoints (0: only at the end)")
    log_every: int = opt(50, "steps between log lines")
    compile: bool = opt(False, "torch.compile the model for training", action="store_true")
    grad_ckpt: bool = opt(False, "activation checkpointing per block", action="store_true")
    backend: str = opt("auto", "kernel backend of every op", choices=BACKENDS)
    device: str = opt("cuda" if torch.cuda.is_available() else "cpu", "device to train on")
    threads: int = opt(0, "torch CPU threads (0: torch's default)")
    model_kwargs: str = opt("{}", "JSON dict of backbone overrides, e.g. '{\"depth\": 4}'")
    quiet: bool = opt(False, "no progress lines", action="store_true")
