"""One trainer for every method: `effkernels-train` / `python -m effkernels.models.train`.

    effkernels-train --data digits --out runs/digits            # the baseline (SiT) on digits, CPU-sized defaults
    torchrun --nproc_per_node 2 -m effkernels.models.train ...  # data parallel (gloo on CPU, nccl on GPU)

A method is an object with `loss(model, batch, step) -> dict` (key "loss" required, other scalar
entries are logged), registered by name with `register_method`. Optionally it has `module`, an
nn.Module of its own trainable parts (optimised, gradient-averaged and checkpointed with the model),
and `attach(trainer)`, called once, for methods that need the EMA model or the data set; methods with
a second optimiser (ACT's discriminator) step it inside `loss` and expose `state_dict()` /
`load_state_dict()` so that it is checkpointed. A factory's static `add_args(parser)` adds its options.
`batch` is dict(x=(B, C, H, W), y=(B,), generator=torch.Generator seeded by (seed, step, rank)).

Defaults are the CPU digits job: tiny/2 (16 tokens), 1000 steps of batch 64, lr 2e-3, EMA 0.999 with warm-up
(decay_k = min(0.999, (1 + k) / (10 + k))): SiT's 0.9999 averages over ~10K steps, longer than the
whole run, so it would still be mostly the initial weights at the end.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable

import torch

from . import ddp
from .checkpoint import CheckpointError, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .data import DataError, batch_indices, load_dataset
from .objectives import FlowMatching
from .runlog import MetricsLog, Progress, plot_curves

# -----------------------------------------------------------------------------------------------
# Methods
# -----------------------------------------------------------------------------------------------

METHODS: dict[str, Callable] = {}


def register_method(name: str):
    """Decorator: METHODS[name] = factory(model, args) -> method object."""
    def deco(factory):
        METHODS[name] = factory
        return factory
    return deco


@register_method("sit")
class SiT:
    """The baseline: SiT's flow-matching loss, nothing else."""

    def __init__(self, model=None, args=None):
        self.objective = FlowMatching()

    def loss(self, model, batch, step) -> dict:
        res = self.objective.loss(model, batch["x"], batch["y"], batch.get("generator"),
                                  t=batch.get("t"), noise=batch.get("noise"))
        return {"loss": res["loss"]}


def _load_plugin_methods() -> None:
    """Methods living in effkernels.models.methods register themselves on import, if that package exists."""
    try:
        import effkernels.models.methods  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name not in ("effkernels.models.methods",):
            raise


# -----------------------------------------------------------------------------------------------
# EMA
# -----------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters (buffers copied), with optional warm-up."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# -----------------------------------------------------------------------------------------------
# The trainer
# -----------------------------------------------------------------------------------------------


def _checkpoint_blocks(model) -> None:
    """Activation checkpointing per transformer block: recompute the block in backward.

    Patches each block's forward on the instance, so module names and state_dict keys are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for blk in model.blocks:
        fwd = blk.forward
        blk.forward = functools.partial(lambda f, *a, **k: checkpoint(f, *a, use_reentrant=False, **k), fwd)


class ConfigError(ValueError):
    """A setting that argparse cannot check alone (it depends on the data, the checkpoint or the world size)."""


class Trainer:
    def __init__(self, args, ds=None):
        from .backbone import build

        self.args = args
        self.device = torch.device(args.device)
        self.dist = ddp.init_from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if args.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the "
                              f"{self.dist.world_size} processes")
        self.ds = ds if ds is not None else load_dataset(args.data)
        torch.manual_seed(args.seed)  # same initial weights on every rank (also broadcast below)
        kw = {"input_size": self.ds.size, "in_channels": self.ds.channels, "num_classes": self.ds.num_classes}
        kw.update(args.model_kwargs or {})
        self.model_kwargs = kw
        self.model = build(args.model, **kw).to(self.device)
        self.method = METHODS[args.method](self.model, args)
        extra = getattr(self.method, "module", None)
        self.extra = extra.to(self.device) if extra is not None else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.extra is not None:
            self.params += [p for p in self.extra.parameters() if p.requires_grad]
        ddp.broadcast_params(list(self.model.parameters()) + list(self.model.buffers()) +
                             (list(self.extra.parameters()) if self.extra is not None else []))
        self.ema = EMA(self.model, args.ema, warmup=not args.ema_no_warmup)
        if args.grad_ckpt:
            _checkpoint_blocks(self.model)
        self.forward_model = torch.compile(self.model) if args.compile else self.model
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.step = 0
        # each rank draws its own label dropout from the global RNG
        torch.manual_seed(args.seed * 1000 + 17 + self.dist.rank)
        if hasattr(self.method, "attach"):
            self.method.attach(self)
        self.evaluator = None

    # --- state -----------------------------------------------------------------------------------
    def meta(self) -> dict:
        vr = list(self.ds.value_range) if self.ds.value_range is not None else None
        a = {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {"model": self.args.model, "model_kwargs": self.model_kwargs, "method": self.args.method,
                "data": self.args.data, "value_range": vr, "shape": [self.ds.channels, self.ds.size, self.ds.size],
                "args_json": json.dumps(a)}

    def state_dict(self) -> dict:
        rngs = ddp.all_gather_objects(capture_rng())
        extra = self.extra.state_dict() if self.extra is not None else {}
        own = self.method.state_dict() if hasattr(self.method, "state_dict") else {}
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                "optimizer": self.opt.state_dict(), "method": extra, "method_state": own, "rng": rngs,
                "meta": self.meta()}

    def save(self, path: str) -> None:
        state = self.state_dict()  # collective: every rank takes part, rank 0 writes
        if self.dist.is_main:
            save_checkpoint(state, path)
        ddp.barrier()

    def load(self, path: str) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        if ck["meta"].get("model") != self.args.model:
            raise ConfigError(f"checkpoint {path!r} holds model {ck['meta'].get('model')!r}, "
                                  f"not --model {self.args.model!r}")
        self.model.load_state_dict(ck["model"])
        self.ema.model.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.extra is not None and ck.get("method"):
            self.extra.load_state_dict(ck["method"])
        if hasattr(self.method, "load_state_dict") and ck.get("method_state"):
            self.method.load_state_dict(ck["method_state"])
        rngs = ck["rng"]
        if len(rngs) == self.dist.world_size:
            restore_rng(rngs[self.dist.rank])
        elif self.dist.rank == 0:
            # Batches and noise come from per-step generators and stay identical; only the global
            # RNG streams (label dropout) start afresh, so the run is not bit-for-bit a continuation.
            print(f"warning: {path!r} was saved by {len(rngs)} processes, this run has "
                  f"{self.dist.world_size}: global RNG states not restored", file=sys.stderr)
        self.step = int(ck["step"])

    # --- one step ----------------------------------------------------------------------------------
    def make_batch(self, step: int) -> dict:
        """This rank's shard of the global batch of `step` (the same global batch whatever the world size)."""
        idx = batch_indices(len(self.ds), self.args.batch_size, self.args.seed, step)
        per = self.args.batch_size // self.dist.world_size
        idx = idx[self.dist.rank * per:(self.dist.rank + 1) * per]
        g = torch.Generator(device=self.device).manual_seed(
            (self.args.seed * 7_919 + step * 1_000_003 + self.dist.rank) % (2**63))
        return {"x": self.ds.x[idx].to(self.device, non_blocking=True), "y": self.ds.y[idx].to(self.device),
                "generator": g}

    def train_step(self, batch: dict) -> dict:
        self.model.train()
        amp = self.device.type == "cuda"  # bf16 autocast on GPU only: CPU bf16 matmuls are slower here
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            out = self.method.loss(self.forward_model, batch, self.step)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        ddp.average_gradients(self.params)
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        lr = self.args.lr * min(1.0, (self.step + 1) / self.args.warmup) if self.args.warmup else self.args.lr
        for gr in self.opt.param_groups:
            gr["lr"] = lr
        self.opt.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        logs = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        logs.update(grad_norm=float(gn), lr=lr)
        return logs

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, grid_path: str | None = None) -> dict:
        """FD and class accuracy of EMA samples (Heun, no guidance); rank 0 only."""
        from .metrics import Evaluator
        from .sample import sample, save_grid

        if self.evaluator is None:
            self.evaluator = Evaluator(self.ds)
        n, ncls = self.args.eval_samples, self.ds.num_classes
        y = torch.arange(n) % ncls
        g = torch.Generator().manual_seed(self.args.seed + 12345)  # same noise at every eval: comparable curves
        noise = torch.randn((n, self.ds.channels, self.ds.size, self.ds.size), generator=g)
        imgs = []
        for s in range(0, n, 500):
            imgs.append(sample(self.ema.model, y[s:s + 500].to(self.device), noise=noise[s:s + 500].to(self.device),
                               sampler="heun", steps=self.args.eval_steps, clamp=self.ds.value_range).cpu())
        imgs = torch.cat(imgs)
        res = self.evaluator(imgs, y)
        if grid_path and self.ds.value_range is not None and self.ds.channels in (1, 3):
            order = torch.argsort(y[:100], stable=True)  # one row per class
            save_grid(imgs[:100][order], grid_path, nrow=10, value_range=self.ds.value_range)
        return res

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict:
        a, main = self.args, self.dist.is_main
        os.makedirs(a.out, exist_ok=True)
        resume = a.resume
        if resume == "auto":
            resume = os.path.join(a.out, "last.pt") if os.path.isfile(os.path.join(a.out, "last.pt")) else None
        if resume:
            self.load(resume)
        log = MetricsLog(a.out, resume_step=self.step if resume else None) if main else None
        bar = Progress(self.step, a.steps, enabled=main and not a.quiet, every=a.log_every)
        if main and resume:
            bar.write(f"resumed from {resume} at step {self.step}")
        final = {}

        def do_eval():
            if main:
                t0 = time.time()
                grid = os.path.join(a.out, f"samples_{self.step:06d}.png")
                res = self.evaluate(grid)
                log.write({"step": self.step, **res})
                res["grid"] = grid if os.path.exists(grid) else None
                bar.write(f"eval step {self.step}: fd={res['fd']:.4g} acc={res.get('acc', float('nan')):.3f} "
                          f"({time.time() - t0:.1f}s)")
                final.update(res)
            ddp.barrier()

        if a.eval_every and self.step == 0:
            do_eval()  # the untrained model's FD: the reference for "how much did training buy"
            final["fd_init"] = final.get("fd")
        t_start, t_last, n_last = time.time(), time.time(), self.step
        loss_sum = 0.0
        while self.step < a.steps:
            logs = self.train_step(self.make_batch(self.step))
            loss_sum += logs["loss"]
            if self.step % a.log_every == 0 or self.step == a.steps:
                now = time.time()
                ips = (self.step - n_last) * a.batch_size / max(now - t_last, 1e-9)
                # the mean over the interval and the ranks: one step's loss is too noisy to plot
                logs["loss"] = ddp.all_reduce_mean(loss_sum / (self.step - n_last))
                t_last, n_last, loss_sum = now, self.step, 0.0
                if main:
                    log.write({"step": self.step, "wall_s": now - t_start, "img_per_s": ips, **logs})
                bar.update(self.step, loss=logs["loss"], img_s=ips)
            if a.eval_every and (self.step % a.eval_every == 0 or self.step == a.steps):
                do_eval()
            if a.ckpt_every and self.step % a.ckpt_every == 0 and self.step < a.steps:
                self.save(os.path.join(a.out, "last.pt"))
        bar.close()
        self.save(os.path.join(a.out, "last.pt"))
        if main:
            curves = plot_curves(log.jsonl, os.path.join(a.out, "curves.png"))
            final.update(step=self.step, wall_s=time.time() - t_start, curves=curves)
            if self.evaluator is not None:
                final["classifier_acc"] = self.evaluator.classifier_accuracy
        return final


# -----------------------------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effkernels-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="sit", help="training method (registered: see --list-methods)")
    p.add_argument("--model", default="tiny/2", help="backbone config name, e.g. tiny/2, SiT-B/2")
    p.add_argument("--data", default="digits", help="'digits', an image folder, or a .npz/.npy latent file")
    p.add_argument("--out", default="runs/digits", help="output folder (checkpoints, logs, grids, curves)")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (a resumed run continues to it)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear lr warm-up steps (0: none)")
    p.add_argument("--grad-clip", type=float, default=1.0)
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
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda", "cpp"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--model-kwargs", default="{}", help="JSON dict of backbone overrides, e.g. '{\"depth\": 4}'")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--list-methods", action="store_true")
    for name, factory in sorted(METHODS.items()):
        if hasattr(factory, "add_args"):
            factory.add_args(p.add_argument_group(f"method {name}"))
    return p


def _check_backend(p: argparse.ArgumentParser, backend: str, device: str) -> None:
    """A named backend that cannot run on this device is an argument error now, not a failure mid-run."""
    from effkernels.backends import available

    if backend != "auto":
        ok, why = available(backend, torch.device(device))
        if not ok:
            p.error(f"--backend {backend} cannot run on {device} here: {why}")


def parse_args(argv=None) -> argparse.Namespace:
    _load_plugin_methods()
    p = build_parser()
    a = p.parse_args(argv)
    if a.list_methods:
        print("\n".join(sorted(METHODS)))
        raise SystemExit(0)
    if a.method not in METHODS:
        p.error(f"--method {a.method!r} is not registered; known: {', '.join(sorted(METHODS))}")
    from .backbone import CONFIGS

    if a.model not in CONFIGS:
        p.error(f"--model {a.model!r} is unknown; known: {', '.join(CONFIGS)}")
    for name in ("steps", "batch_size", "eval_samples", "eval_steps", "log_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("eval_every", "ckpt_every", "warmup", "threads"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        p.error(f"--lr must be a positive number, got {a.lr}")
    if not (0.0 <= a.ema < 1.0):
        p.error(f"--ema must lie in [0, 1), got {a.ema}")
    if a.grad_clip <= 0:
        p.error(f"--grad-clip must be > 0, got {a.grad_clip}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device} but no CUDA device is available")
    _check_backend(p, a.backend, a.device)
    try:
        a.model_kwargs = json.loads(a.model_kwargs)
        assert isinstance(a.model_kwargs, dict)
    except (ValueError, AssertionError):
        p.error(f"--model-kwargs must be a JSON object, got {a.model_kwargs!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.batch_size % world:
        p.error(f"--batch-size {a.batch_size} is not divisible by WORLD_SIZE={world}")
    if a.resume and a.resume != "auto" and not os.path.isfile(a.resume):
        p.error(f"--resume {a.resume!r}: no such checkpoint file")
    return a


def main(argv=None) -> int:
    import effkernels

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        with effkernels.use_backend(a.backend):
            trainer = Trainer(a)
            res = trainer.run()
    except (DataError, CheckpointError, ConfigError) as e:
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
