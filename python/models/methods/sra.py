"""SRA: self-representation alignment.

No external encoder: the teacher is the student's own EMA (eval mode, no grad), given the same clean
x, the same noise and the same post-dropout labels, at LESS noise per sample, through the forward
process of the objective it composes with:
    flow matching (SiT, MaskDiT; t in [0, 1]):  t_teacher = clamp(t - t_max * U(0, 1), 0, 1),
        x_teacher = (1 - t_teacher) x + t_teacher noise;
    DDPM (DiT; integer steps 0..T-1):            t_teacher = clamp(t - k, 1, T - 1), k ~ U{0, ..,
        int(T t_max) - 1} (DiT-SRA's rule), never above t (a student at step 0 keeps a teacher at
        step 0), x_teacher = the objective's q_sample(x, t_teacher, noise);
with t_max = 0.2; the teacher is never noisier than the student. An objective whose output carries
no t and noise (the consistency methods) is refused. The student's hidden state at depth s goes through a head
Linear(D, 2D) - SiLU - Linear(2D, D) (xavier-uniform weights, zero biases, as the release
initialises it); the teacher's raw hidden state at depth t_b is the target, its forward stopped
there (stop_at). Loss: the per-token cosine over the feature dimension
(effkernels.ops.cosine_alignment_loss, fused, float32), weight 0.5 at every step; `--sra-loss
smooth_l1` (beta 0.05, the mean over all elements, as the release's F.smooth_l1_loss) is the
paper's original form, with the weight schedule of the authors' release (SiT-SRA/train.py, read for
its formula, not copied):
    weight(epoch) = 0.2                                      for epoch <= E0
                  = 0.2 * 0.1 ** ((epoch - E0) / L)          after (ten times smaller every L epochs)
with E0 = 149, L = 1000 at 256 px (their 512 px runs: 99, 800), epoch = the integer count of passes
over the data (step * global batch // data set size), as their loop counts it. `--sra-weight-schedule
constant` keeps the weight fixed (the release's cosine loss is constant 0.5, our default).

Label dropout is drawn here and passed to the student (force_drop_ids) and to the teacher, so both
see the same labels. Composition: with TREAD the student's hidden state is the full sequence; with
MaskDiT it holds the kept tokens and the teacher's (dense) hidden state is gathered at them (packed
rows, with a ratio per sample, weighted 1 / (B * count): every sample weighs as at a fixed count).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effkernels import ops
from effkernels.nn.routing import TokenPack

from ..objectives.ddpm import GaussianDiffusion
from ..objectives.flow import interpolate
from .base import ConfigError, Method, draw_label_dropout
from ..options import add_options, opt, read_options
from .registry import register_method

# (student depth, teacher depth) by model depth, from the authors' scripts: B (12) 3 -> 8 (their
# SiT-B script), XL (28) 8 -> 20 (SiT; DiT-XL with learned sigma 8 -> 16). Other depths: a third and
# two thirds of the way up.
PAIRS = {12: (3, 8), 28: (8, 20)}


def default_pair(depth: int, learn_sigma: bool = False) -> tuple[int, int]:
    if depth == 28 and learn_sigma:
        return 8, 16
    return PAIRS.get(depth, (max(1, round(depth / 3)), max(1, round(2 * depth / 3))))


@dataclass
class SRAOptions:
    sra_student_depth: int | None = opt(None, "student block s (1-based); default 3 for depth 12 (the authors' SiT-B "
                                         "script), 8 for 28, else round(depth/3)", type=int)
    sra_teacher_depth: int | None = opt(None, "teacher (EMA) block t_b, where its forward stops; default 8 for depth 12, "
                                         "20 for 28 (16 for DiT-XL), else round(2 depth/3)", type=int)
    sra_t_max: float = opt(0.2, "the teacher's less-noisy time: flow matching t - t_max * U(0, 1), clamped to [0, 1]; "
                                "DDPM (dit) t - randint(0, int(1000 t_max)), clamped to [1, 999] and never above t")
    sra_loss: str = opt("cosine", "per-token cosine over features (default) or the paper's smooth-L1 (beta 0.05, the "
                                  "mean over tokens and features)", choices=("cosine", "smooth_l1"))
    sra_weight: float | None = opt(None, "weight of the alignment term (at the start, if it decays); default 0.5 "
                                         "(cosine) or 0.2 (smooth_l1)", type=float)
    sra_weight_schedule: str | None = opt(None, "release: the weight stays until epoch --sra-decay-start, then falls "
                                                "10x every --sra-decay-every epochs (the SRA release's smooth-L1 "
                                                "schedule); default release for smooth_l1, constant for cosine",
                                          type=str, choices=("constant", "release"))
    sra_decay_start: float = opt(149.0, "epoch after which the release schedule decays (their 256 px value; 512 px: 99)")
    sra_decay_every: float = opt(1000.0, "epochs per 10x decay of the release schedule (their 256 px value; 512 px: "
                                         "800)")


@register_method("sra")
class SRA(Method):
    """Flow loss + weight x alignment of a head on the student's depth s with its EMA's depth t_b."""

    takes_packed_hidden = True  # extra_losses reads a TokenPack keep index (Composite checks this)
    teacher_ema = 0.9999  # the teacher is the trainer's EMA: SRA's is 0.9999 from step 0

    @staticmethod
    def add_args(group) -> None:
        add_options(group, SRAOptions)

    def __init__(self, model=None, args=None, *, teacher: nn.Module | None = None,
                 steps_per_epoch: float | None = None):
        super().__init__(model, args)
        if model is None:
            raise ConfigError("SRA needs the backbone to size its head")
        o = read_options(SRAOptions, args)
        s, tb = default_pair(model.depth, model.learn_sigma)
        self.student_depth = int(o.sra_student_depth or s)
        self.teacher_depth = int(o.sra_teacher_depth or tb)
        for name, d in (("--sra-student-depth", self.student_depth), ("--sra-teacher-depth", self.teacher_depth)):
            if not 1 <= d <= model.depth:
                raise ConfigError(f"{name} must lie in [1, {model.depth}], got {d}")
        self.t_max = float(o.sra_t_max)
        if not 0.0 <= self.t_max <= 1.0:
            raise ConfigError(f"--sra-t-max must lie in [0, 1], got {self.t_max}")
        self.loss_kind = o.sra_loss
        w = o.sra_weight
        self.weight = float(w) if w is not None else (0.5 if self.loss_kind == "cosine" else 0.2)
        if self.weight < 0:
            raise ConfigError(f"--sra-weight must be >= 0, got {self.weight}")
        sched = o.sra_weight_schedule
        self.schedule = sched or ("release" if self.loss_kind == "smooth_l1" else "constant")
        self.decay_start = float(o.sra_decay_start)
        self.decay_every = float(o.sra_decay_every)
        if self.decay_start < 0 or self.decay_every <= 0:
            raise ConfigError(f"need --sra-decay-start >= 0 and --sra-decay-every > 0, got {self.decay_start}, "
                              f"{self.decay_every}")
        # optimizer steps per pass over the data; the trainer's attach sets it from the data set
        self.steps_per_epoch = steps_per_epoch
        d = model.hidden_size
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        for lin in (self.head[0], self.head[2]):  # the release's init of every Linear
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.backbone = model
        self.teacher = teacher

    def modules(self):
        return {"sra_head": self.head}

    def attach(self, trainer) -> None:
        self.teacher = trainer.ema_model()  # the EMA the trainer updates after every step
        # the release's loader drops the last partial batch, as steps_per_epoch does
        self.steps_per_epoch = trainer.steps_per_epoch()

    def epoch(self, step: int) -> int:
        """Completed passes over the data before `step` (the release's integer epoch counter)."""
        if self.steps_per_epoch is None:
            raise ConfigError("SRA's release weight schedule counts epochs: run it in the trainer or pass "
                              "steps_per_epoch=")
        return int(step // self.steps_per_epoch)

    def weight_at(self, step: int) -> float:
        """The alignment weight at `step`: constant, or w0 until epoch E0, then w0 * 0.1^((epoch - E0) / L)."""
        if self.schedule == "constant":
            return self.weight
        e = self.epoch(step)
        return self.weight if e <= self.decay_start else self.weight * 0.1 ** ((e - self.decay_start) / self.decay_every)

    def forward_options(self, model, batch, step):
        opts = {"return_hidden": (self.student_depth,)}
        drop = draw_label_dropout(self.backbone, batch)
        if drop is not None:
            opts["force_drop_ids"] = drop
        return opts

    def teacher_t(self, t: torch.Tensor, generator) -> torch.Tensor:
        """Flow matching, per sample: t_teacher = clamp(t - t_max U, 0, 1) <= t, never more noise."""
        u = torch.rand(t.shape, generator=generator, device=generator.device if generator is not None else t.device)
        return (t - self.t_max * u.to(t.device, t.dtype)).clamp(0.0, 1.0)

    def teacher_step(self, t: torch.Tensor, num_steps: int, generator) -> torch.Tensor:
        """DDPM, per sample: t_teacher = clamp(t - k, 1, T - 1), k ~ U{0, .., int(T t_max) - 1} (DiT-SRA's
        rule), and never above t (a student at step 0 keeps its teacher at 0): integer steps <= t."""
        width = int(num_steps * self.t_max)
        dev = generator.device if generator is not None else t.device
        k = (torch.randint(0, width, t.shape, generator=generator, device=dev) if width > 0
             else torch.zeros(t.shape, dtype=torch.long, device=dev))
        return torch.minimum((t - k.to(t.device, t.dtype)).clamp(1, num_steps - 1), t)

    def teacher_input(self, out, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_teacher, the time the teacher network is given), from the objective's own forward
        process at the teacher's less-noisy time, with the student's x and noise."""
        t, noise = out.get("t"), out.get("noise")
        if t is None or noise is None:
            raise ConfigError("SRA composes with a flow-matching (sit, maskdit) or DDPM (dit) objective: this "
                              "objective reports no t and noise to noise the teacher's input with")
        g = batch.get("generator")
        diffusion = out.get("diffusion")
        if isinstance(diffusion, GaussianDiffusion):  # DDPM: integer steps 0..T-1
            t_s = self.teacher_step(t, diffusion.num_steps, g)
            return diffusion.q_sample(batch["x"], t_s, noise), diffusion.model_time(t_s)
        if not t.is_floating_point():
            raise ConfigError(f"SRA: the objective's t is {t.dtype} without its diffusion process; SRA's flow "
                              "rule needs t in [0, 1]")
        t_s = self.teacher_t(t, g)
        return interpolate(batch["x"], noise, t_s), t_s

    @torch.no_grad()
    def target(self, out, batch) -> torch.Tensor:
        if self.teacher is None:
            raise ConfigError("SRA has no teacher: run it in the trainer (its EMA) or pass teacher=")
        x_t, t_s = self.teacher_input(out, batch)
        drop = (out.get("options") or {}).get("force_drop_ids")
        was = self.teacher.training
        self.teacher.eval()
        try:
            _, hidden = self.teacher(x_t, t_s, batch["y"], stop_at=self.teacher_depth,
                                     return_hidden=(self.teacher_depth,), force_drop_ids=drop)
        finally:
            self.teacher.train(was)
        return hidden[self.teacher_depth]

    def extra_losses(self, out, model, batch, step):
        hidden = out.get("hidden") or {}
        if self.student_depth not in hidden:
            raise ConfigError(f"SRA: the objective returned no hidden state at depth {self.student_depth}")
        z = self.target(out, batch)  # (B, N, D), no grad
        keep_idx = (out.get("options") or {}).get("keep_idx")
        z_hat, w = self.head(hidden[self.student_depth]), None
        if isinstance(keep_idx, TokenPack):  # per-sample budgets: the student holds packed rows (T, D)
            z, z_hat, w = keep_idx.gather(z)[None], z_hat[None], keep_idx.token_weights()[None]
        elif keep_idx is not None:  # MaskDiT: the student holds the kept tokens only
            z = ops.route_gather(z, keep_idx, check_idx=False)
        if self.loss_kind == "cosine":
            loss = ops.cosine_alignment_loss(z_hat, z, token_weight=w)
        else:
            loss = ops.smooth_l1_alignment_loss(z_hat, z, 0.05, token_weight=w)
        return {"sra": self.weight_at(step) * loss}
