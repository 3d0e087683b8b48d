"""One trainer for every method: `effkernels-train` / `python -m effkernels.models.train`.

    effkernels-train --data digits --out runs/digits            # the baseline (SiT) on digits, CPU-sized defaults
    effkernels-train --method tread+repa ...                     # methods compose with '+'
    torchrun --nproc_per_node 2 -m effkernels.models.train ...  # data parallel (gloo on CPU, nccl on GPU)

Methods live in effkernels.models.methods (the protocol is in methods/base.py): the trainer builds the
method from `--method`, optimises the backbone together with the method's own modules (one AdamW,
one DistributedDataParallel wrapper), steps the method's aux modules (a discriminator) with
optimizers of their own, keeps an EMA of the generator (backbone and the method's generator
modules), and lets the method sample for evaluation.

Defaults are the CPU digits job: tiny/2 (16 tokens), 1000 steps of batch 64, lr 2e-3, EMA 0.999 with warm-up
(decay_k = min(0.999, (1 + k) / (10 + k))): SiT's 0.9999 averages over ~10K steps, longer than the
whole run, so it would still be mostly the initial weights at the end.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import sys
import time

import torch
from torch import nn

from .. import ddp
from ..backbone.configs import build
from ..checkpoint import CheckpointError, capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from ..data.sources import load_dataset
from ..methods import ConfigError, build_method
from ..metrics.classifier import Evaluator
from ..objectives.prediction import predicts_noise
from ..sampling.images import save_grid
from .batches import collate, global_indices, hflip_mask, make_loader, step_keys
from .ema import EMA
from .runlog import MetricsLog, Progress, plot_curves

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


class TrainModule(nn.Module):
    """What the main optimizer trains and DistributedDataParallel wraps: the backbone and the method's
    modules; forward(batch, step) is the method's loss, so DDP sees the whole step's graph.

    `forward_backbone` is what the method calls (the backbone, or its torch.compile'd form); it is
    held outside the module tree so that state_dict keys stay backbone.* and modules.*.
    """

    def __init__(self, backbone: nn.Module, modules: nn.ModuleDict, method, forward_backbone=None):
        super().__init__()
        self.backbone, self.modules_ = backbone, modules
        self._method = method
        self._forward = [forward_backbone if forward_backbone is not None else backbone]

    def forward(self, batch: dict, step: int) -> dict:
        return self._method.loss(self._forward[0], batch, step)


class AuxStep(nn.Module):
    """One aux module (a discriminator) and the loss its own optimizer minimises, for DDP to wrap."""

    def __init__(self, name: str, module: nn.Module, method):
        super().__init__()
        self.name, self.module, self._method = name, module, method

    def forward(self, batch: dict, step: int, out: dict) -> dict:
        return self._method.aux_loss(self.name, self.module, batch, step, out)


def _plain(v) -> bool:
    """A value that round-trips through JSON (the options a method is rebuilt from for sampling)."""
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return isinstance(v, (int, float, str, bool, type(None)))


def make_optimizer(params, device: torch.device, **kw) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) where torch has it for the device: CPU and CUDA."""
    fused = device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kw)


def generator_optimizer_settings(method, args) -> dict:
    """The generator AdamW's betas, eps and weight decay: the trainer's (0.9, 0.999), 1e-8, 0, then what
    the method needs (Method.generator_optimizer), then --adam-betas."""
    kw = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, **method.generator_optimizer()}
    if args.adam_betas is not None:
        kw["betas"] = tuple(args.adam_betas)
    kw["betas"] = tuple(float(b) for b in kw["betas"])
    return kw


def stale_temp_files(path: str) -> list[str]:
    """Temp files that save_checkpoint leaves beside `path` when a process dies mid-write."""
    return glob.glob(glob.escape(os.path.abspath(path)) + ".*.tmp")


class Trainer:
    def __init__(self, args, ds=None):
        self.args = args
        self.device = torch.device(args.device)
        self.dist = ddp.init_from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if args.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the "
                              f"{self.dist.world_size} processes")
        self.ds = ds if ds is not None else load_dataset(args.data)
        torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        kw = {"input_size": self.ds.size, "in_channels": self.ds.channels, "num_classes": self.ds.num_classes}
        kw.update(args.model_kwargs or {})
        self.model_kwargs = kw
        self.model = build(args.model, **kw).to(self.device)
        self.method = build_method(args.method, self.model, args)
        missing = [k for k in self.method.batch_keys if k not in self.ds.extras]
        if missing:
            raise ConfigError(f"--method {args.method} needs the per-sample arrays {missing} in --data "
                              f"{args.data!r}, which has {sorted(self.ds.extras) or 'none'}")
        self._configure_data()
        self.modules = nn.ModuleDict(self.method.modules()).to(self.device)
        aux = self.method.aux_modules()
        self.aux = {k: a for k, a in aux.items()}
        for a in self.aux.values():
            a.module.to(self.device)
        if args.grad_ckpt:
            _checkpoint_blocks(self.model)
        fwd = torch.compile(self.model) if args.compile else self.model
        self.train_module = TrainModule(self.model, self.modules, self.method, fwd)
        self.ddp_module = ddp.wrap(self.train_module, self.device,
                                   find_unused_parameters=self.method.find_unused_parameters)
        self.ema = EMA(self.generator(), args.ema, warmup=not args.ema_no_warmup)
        self.params = [p for p in self.train_module.parameters() if p.requires_grad]
        self.opt_settings = generator_optimizer_settings(self.method, args)
        self.opt = make_optimizer(self.params, self.device, lr=args.lr, **self.opt_settings)
        self.aux_steps, self.aux_opts = {}, {}
        for k, a in self.aux.items():
            self.aux_steps[k] = ddp.wrap(AuxStep(k, a.module, self.method), self.device,
                                         find_unused_parameters=self.method.find_unused_parameters)
            self.aux_opts[k] = make_optimizer([p for p in a.module.parameters() if p.requires_grad], self.device,
                                              lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
        self.step = 0
        # each rank draws its own label dropout from the global RNG
        torch.manual_seed(args.seed * 1000 + 17 + self.dist.rank)
        self.method.attach(self)
        self.evaluator = None

    def _configure_data(self) -> None:
        """Streamed latent folders read the raw image only when a method asks for it, and flip in the
        worker; in-memory data flips here, and only arrays with an image layout can be mirrored."""
        a = self.args
        shuffle, hflip = a.shuffle, a.hflip
        if shuffle == "epoch" and len(self.ds) < a.batch_size:
            raise ConfigError(f"--shuffle epoch needs at least one full batch: --data {a.data!r} has "
                              f"{len(self.ds)} samples, --batch-size is {a.batch_size}")
        if getattr(self.ds, "streamed", False):
            self.ds.hflip, self.ds.with_image = bool(hflip), "image" in self.method.batch_keys
        elif hflip:
            flat = [k for k in self.method.batch_keys if self.ds.extras[k].dim() != 4]
            if flat:
                raise ConfigError(f"--hflip mirrors (N, C, H, W) arrays; the per-sample arrays {flat} are not "
                                  "images (pre-computed features of the unflipped image would not match)")

    # --- the API methods use (methods/base.py) ----------------------------------------------------
    def ema_model(self) -> nn.Module:
        return self.ema.model

    def steps_per_epoch(self) -> int:
        return max(1, len(self.ds) // self.args.batch_size)

    def save_named(self, name: str) -> None:
        self.save(os.path.join(self.args.out, name))

    def reset_optimizer(self) -> None:
        self.opt.state.clear()

    def reset_ema(self) -> None:
        self.ema.load_state_dict({k: m.state_dict() for k, m in self.generator().items()})

    def generator(self) -> dict[str, nn.Module]:
        """The live modules that generate samples: the backbone and the method's generator modules."""
        return {"backbone": self.model, **{k: self.modules[k] for k in self.method.generator_modules}}

    # --- state -----------------------------------------------------------------------------------
    def meta(self) -> dict:
        vr = list(self.ds.value_range) if self.ds.value_range is not None else None
        a = {k: v for k, v in vars(self.args).items() if _plain(v)}
        return {"model": self.args.model, "model_kwargs": self.model_kwargs, "method": self.args.method,
                "data": self.args.data, "value_range": vr, "shape": [self.ds.channels, self.ds.size, self.ds.size],
                "args_json": json.dumps(a)}

    def state_dict(self) -> dict:
        rngs = ddp.all_gather_objects(capture_rng())
        ema = self.ema.state_dict()
        method = {"modules": self.modules.state_dict(), "ema": {k: v for k, v in ema.items() if k != "backbone"},
                  "aux": {k: {"module": a.module.state_dict(), "optimizer": self.aux_opts[k].state_dict()}
                          for k, a in self.aux.items()},
                  "state": self.method.state_dict()}
        return {"step": self.step, "model": self.model.state_dict(), "ema": ema["backbone"],
                "optimizer": self.opt.state_dict(), "method": method, "rng": rngs, "meta": self.meta()}

    def save(self, path: str) -> None:
        state = self.state_dict()  # collective: every rank takes part, rank 0 writes
        if self.dist.is_main:
            save_checkpoint(state, path)
        ddp.barrier()

    def load(self, path: str) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        meta = ck.get("meta", {})
        if meta.get("model") != self.args.model:
            raise ConfigError(f"checkpoint {path!r} holds model {meta.get('model')!r}, not --model {self.args.model!r}")
        if meta.get("method") != self.args.method:
            raise ConfigError(f"checkpoint {path!r} was trained with --method {meta.get('method')!r}, not "
                              f"--method {self.args.method!r}; resume with the same method")
        m = ck.get("method")
        if not isinstance(m, dict) or "modules" not in m:
            raise CheckpointError(f"checkpoint {path!r} has no method entry (modules, ema, aux, state): it was not "
                                  "written by this effkernels-train")
        own = self.method.state_dict()
        for what, have, need in (("modules", m.get("modules", {}), self.modules.state_dict()),
                                 ("EMA modules", m.get("ema", {}), dict.fromkeys(self.method.generator_modules)),
                                 ("aux modules", m.get("aux", {}), self.aux),
                                 ("state", m.get("state", {}), own)):
            if need and not have:
                raise CheckpointError(f"checkpoint {path!r} lacks the method's {what} ({sorted(need)[:4]}...): "
                                      "it would silently start them afresh")
        self.model.load_state_dict(ck["model"])
        self.modules.load_state_dict(m["modules"])
        self.ema.load_state_dict({"backbone": ck["ema"], **m.get("ema", {})})
        self.opt.load_state_dict(ck["optimizer"])
        for gr in self.opt.param_groups:  # the configured betas/eps/decay, not the checkpoint's
            gr.update(self.opt_settings)
        for k, a in self.aux.items():
            a.module.load_state_dict(m["aux"][k]["module"])
            self.aux_opts[k].load_state_dict(m["aux"][k]["optimizer"])
        self.method.load_state_dict(m.get("state", {}))
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
    def make_batch(self, step: int, cpu: dict | None = None) -> dict:
        """This rank's shard of the global batch of `step` (the same global batch whatever the world size),
        with the data set's extra per-sample arrays under their names. `cpu`: that shard already read
        by the data loader's workers (streamed latent folders)."""
        a, rank, world = self.args, self.dist.rank, self.dist.world_size
        shuffle, per = a.shuffle, a.batch_size // world
        if cpu is None and getattr(self.ds, "streamed", False):
            cpu = collate([self.ds[k] for k in step_keys(len(self.ds), a.batch_size, a.seed, step,
                                                         shuffle=shuffle, rank=rank, world=world)])
        elif cpu is None:
            idx = global_indices(len(self.ds), a.batch_size, a.seed, step, shuffle)[rank * per:(rank + 1) * per]
            cpu = {"x": self.ds.x[idx], "y": self.ds.y[idx], **{k: self.ds.extras[k][idx] for k in self.method.batch_keys}}
            if a.hflip:
                m = hflip_mask(a.batch_size, a.seed, step)[rank * per:(rank + 1) * per].view(-1, 1, 1, 1)
                cpu = {k: torch.where(m, v.flip(-1), v) if v.dim() == 4 else v for k, v in cpu.items()}
        g = torch.Generator(device=self.device).manual_seed(
            (a.seed * 7_919 + step * 1_000_003 + rank) % (2**63))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu.items() if k in ("x", "y", *self.method.batch_keys)}
        batch["generator"] = g
        return batch

    def batches(self, start: int, stop: int):
        """The batches of steps start..stop-1: streamed folders through a DataLoader with
        --data-workers processes (a bounded number of batches ahead), else read here step by step."""
        a = self.args
        workers = a.data_workers
        if getattr(self.ds, "streamed", False) and workers:
            loader = make_loader(self.ds, a.batch_size, a.seed, start, stop, shuffle=a.shuffle,
                                 rank=self.dist.rank, world=self.dist.world_size, workers=workers,
                                 pin=self.device.type == "cuda")
            for step, cpu in enumerate(loader, start):
                yield self.make_batch(step, cpu)
        else:
            for step in range(start, stop):
                yield self.make_batch(step)

    def _check_finite(self, loss: torch.Tensor, what: str) -> None:
        """Every rank learns every rank's loss (one small all_reduce), so all stop together on a bad one."""
        vals = ddp.per_rank(loss)
        bad = [r for r, v in enumerate(vals) if not math.isfinite(v)]
        if bad:
            where = f" on rank(s) {bad} of {len(vals)}" if len(vals) > 1 else ""
            raise FloatingPointError(f"{what} is not finite at step {self.step}{where}: {vals if len(vals) > 1 else vals[0]}")

    def _lr(self, base: float) -> float:
        """Linear warm-up over --warmup steps, then constant."""
        w = self.args.warmup
        return base * min(1.0, (self.step + 1) / w) if w else base

    def train_step(self, batch: dict) -> dict:
        self.method.before_step(self, self.step)
        self.train_module.train()
        amp = self.device.type == "cuda"  # bf16 autocast on GPU only: CPU bf16 matmuls are slower here
        aux_params = [p for a in self.aux.values() for p in a.module.parameters() if p.requires_grad]
        for p in aux_params:  # the generator's loss may run the discriminator: no gradient into it there
            p.requires_grad_(False)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                out = self.ddp_module(batch, self.step)
            loss = out["loss"]
            self.opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages gradients in buckets during this backward
        finally:
            for p in aux_params:
                p.requires_grad_(True)
        self._check_finite(loss, "loss")
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip or math.inf)  # 0: no clipping (DiT, SiT)
        lr = self._lr(self.args.lr)
        for gr in self.opt.param_groups:
            gr["lr"] = lr
        self.opt.step()
        logs = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        for k, a in self.aux.items():
            logs.update(self._aux_step(k, a, batch, out))
        self.step += 1
        self.ema.update(self.generator(), self.step)
        logs.update(grad_norm=float(gn), lr=lr)
        return logs

    def _aux_step(self, name: str, aux, batch: dict, out: dict) -> dict:
        opt = self.aux_opts[name]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            res = self.aux_steps[name](batch, self.step, out)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        self._check_finite(res["loss"], f"{name} loss")
        logs = {f"{name}_{k}": float(v.detach()) for k, v in res.items() if torch.is_tensor(v) and v.numel() == 1}
        params = [p for g in opt.param_groups for p in g["params"]]
        if aux.grad_clip:
            logs[f"{name}_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, aux.grad_clip))
        for gr in opt.param_groups:
            gr["lr"] = self._lr(aux.lr)
        opt.step()
        return logs

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, grid_path: str | None = None) -> dict:
        """FD and class accuracy of samples from the EMA generator (the method's sampler); rank 0 only."""
        if self.evaluator is None:
            # a streamed folder's reference set is a fixed subset held in memory (at most 4096 samples)
            self.evaluator = Evaluator(self.ds.in_memory() if getattr(self.ds, "streamed", False) else self.ds)
        n, ncls = self.args.eval_samples, self.ds.num_classes
        y = torch.arange(n) % ncls
        g = torch.Generator().manual_seed(self.args.seed + 12345)  # same noise at every eval: comparable curves
        noise = torch.randn((n, self.ds.channels, self.ds.size, self.ds.size), generator=g)
        res = {}
        for suffix, over in self.method.eval_samplers().items():
            # DDIM for a noise-predicting (DiT-objective) backbone: deterministic, as Heun is for the flows
            base = "ddim" if predicts_noise(self.model) else "heun"
            opts = {"sampler": base, "steps": self.args.eval_steps, "clamp": self.ds.value_range, **over}
            imgs = torch.cat([self.method.sample(self.ema.models, y[s:s + 500].to(self.device),
                                                 noise[s:s + 500].to(self.device), **opts).cpu()
                              for s in range(0, n, 500)])
            res.update({k + suffix: v for k, v in self.evaluator(imgs, y).items()})
            if suffix == "" and grid_path and self.ds.value_range is not None and self.ds.channels in (1, 3):
                order = torch.argsort(y[:100], stable=True)  # one row per class
                save_grid(imgs[:100][order], grid_path, nrow=10, value_range=self.ds.value_range)
        return res

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict:
        a, main = self.args, self.dist.is_main
        os.makedirs(a.out, exist_ok=True)
        ckpt_path = os.path.join(a.out, "last.pt")
        if main:
            # A process killed inside save_checkpoint leaves its temp file (a whole checkpoint) behind.
            for tmp in stale_temp_files(ckpt_path):
                os.unlink(tmp)
        resume = latest_checkpoint(a.out) if a.resume == "auto" else a.resume
        if resume:
            self.load(resume)
        log = MetricsLog(a.out, resume_step=self.step if resume else None) if main else None
        bar = Progress(self.step, a.steps, enabled=main and not a.quiet, every=a.log_every)
        if main and resume:
            bar.write(f"resumed from {resume} at step {self.step}")
        want = self.method.teacher_ema
        if main and want is not None and (a.ema != want or not a.ema_no_warmup):
            print(f"note: --method {a.method} uses the EMA as its teacher; its paper's is {want} from step 0 "
                      f"(--ema {want} --ema-no-warmup, or --preset); this run: --ema {a.ema}"
                      f"{'' if a.ema_no_warmup else ' with warm-up'}", flush=True)
        if main and self.opt_settings["betas"] != (0.9, 0.999):
            src = "--adam-betas" if a.adam_betas is not None else f"--method {a.method}"
            print(f"generator optimizer: AdamW betas {self.opt_settings['betas']} ({src})", flush=True)
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
        batches = self.batches(self.step, a.steps)
        while self.step < a.steps:
            logs = self.train_step(next(batches))
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
                self.save(ckpt_path)
        batches.close()  # stops the data loader's workers
        bar.close()
        self.save(ckpt_path)
        if main:
            curves = plot_curves(log.jsonl, os.path.join(a.out, "curves.png"))
            final.update(step=self.step, wall_s=time.time() - t_start, curves=curves)
            if self.evaluator is not None:
                final["classifier_acc"] = self.evaluator.classifier_accuracy
        return final


# -----------------------------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------------------------
