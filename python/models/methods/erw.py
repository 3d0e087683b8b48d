"""ERW: embedded representation warm-up, then REPA with a decaying weight (Liu et al., ERW).

Phase 1 (steps 0..W-1): the representation processing region (embedders, position embedding,
blocks 1..L) and REPA's projector at depth L, fed the CLEAN input (t = 0) with its label (the
backbone's own 10% label dropout), trained on the alignment loss alone (weight 0.5); the blocks
above L and the final layer get no gradient (and so, with AdamW, do not move).
Transition (at step W, before that step): a checkpoint `<out>/erw_warmup.pt` of the warmed model,
then blocks L+1..depth and the final layer re-initialised as at construction (the same draw on
every rank), the optimizer's state dropped (a fresh AdamW) and the EMA reset to the warmed weights.
The projector is re-attached at the phase-2 depth.
Phase 2: REPA, lambda(step) = c0 * 2 ** (-(step - W) / half_life) (c0 = 6 for XL, 3 for L, 1
otherwise; half-life 50K steps).
Not copied from the released code: its alignment loss counted only the last batch element (ours
averages every sample, the fused op), and it never transferred the warm weights on a fresh run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ConfigError
from ..options import TrainOptions, add_options, opt, read_options
from .registry import register_method
from .repa import REPA, REPAOptions

C0_BY_DEPTH = {28: 6.0, 24: 3.0}  # XL, L; 1 otherwise


@dataclass
class ERWOptions:
    erw_warmup_steps: int | None = opt(None, 'phase-1 steps W; default 100000 (the paper) for widths >= 384, else 200 '
                                             '(a fifth of the digits job)', type=int)
    erw_region: int | None = opt(None, 'blocks 1..L warmed up; default 4, 2 for models of depth < 12', type=int)
    erw_c0: float | None = opt(None, 'phase-2 alignment weight at step W; default 6 for XL (depth 28), 3 for L (24), '
                                     'else 1', type=float)
    erw_half_life: float = opt(50_000.0, 'steps over which the phase-2 weight halves')


@register_method("erw")
class ERW(REPA):
    """Warm blocks 1..L up on the encoder at t = 0, then REPA with a halving alignment weight."""

    owns_objective = True
    find_unused_parameters = True  # phase 1 trains the region only

    @staticmethod
    def add_args(group) -> None:
        add_options(group, ERWOptions)

    def __init__(self, model=None, args=None, *, encoders=None):
        super().__init__(model, args, encoders=encoders)
        o = read_options(ERWOptions, args)
        wide = model.hidden_size >= 384
        w = o.erw_warmup_steps
        self.warmup_steps = int(w) if w is not None else (100_000 if wide else 200)
        region = o.erw_region
        self.region = int(region) if region is not None else (4 if model.depth >= 12 else 2)
        if read_options(REPAOptions, args).repa_depth is None:
            self.depth = max(1, model.depth // 2)  # the paper: re-attached at 14 for XL
        c0 = o.erw_c0
        self.c0 = float(c0) if c0 is not None else C0_BY_DEPTH.get(model.depth, 1.0)
        self.half_life = float(o.erw_half_life)
        if self.warmup_steps < 0:
            raise ConfigError(f"--erw-warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 1 <= self.region < model.depth:
            raise ConfigError(f"--erw-region must lie in [1, {model.depth - 1}], got {self.region}")
        if self.half_life <= 0 or self.c0 < 0:
            raise ConfigError(f"--erw-half-life must be > 0 and --erw-c0 >= 0, got {self.half_life}, {self.c0}")
        self.seed = read_options(TrainOptions, args).seed
        self.transitioned = self.warmup_steps == 0

    def weight_at(self, step: int) -> float:
        """lambda(step) = c0 * 2 ** (-(step - W) / half_life), for phase-2 steps."""
        return self.c0 * 2.0 ** (-(step - self.warmup_steps) / self.half_life)

    def in_warmup(self, step: int) -> bool:
        return step < self.warmup_steps

    # --- the two losses ----------------------------------------------------------------------------
    def forward_options(self, model, batch, step):
        return {} if self.in_warmup(step) else {"return_hidden": (self.depth,)}

    def objective(self, model, batch, step, options):
        if not self.in_warmup(step):
            return super().objective(model, batch, step, options)
        if options:
            raise ConfigError(f"ERW's warm-up takes no forward options from other methods, got {sorted(options)}")
        x = batch["x"]
        t0 = torch.zeros(x.shape[0], device=x.device)  # the clean input
        _, hidden = model(x, t0, batch["y"], stop_at=self.region, return_hidden=(self.region,))
        loss = 0.5 * self.align(hidden[self.region], batch, {})
        return {"loss": loss, "erw_align": loss.detach(), "options": {}}

    def extra_losses(self, out, model, batch, step):
        if self.in_warmup(step):
            return {}
        h = (out.get("hidden") or {}).get(self.depth)
        if h is None:
            raise ConfigError(f"ERW: the objective returned no hidden state at depth {self.depth}")
        return {"repa": self.weight_at(step) * self.align(h, batch, out)}

    # --- the transition ------------------------------------------------------------------------------
    def before_step(self, trainer, step):
        if self.transitioned or step < self.warmup_steps:
            return
        trainer.save_named("erw_warmup.pt")  # phase 1 stays resumable
        model = trainer.model
        with torch.random.fork_rng(devices=[]):  # the same fresh weights on every rank, replayable
            torch.manual_seed(self.seed * 1_000_003 + self.warmup_steps)
            model.reset_blocks(range(self.region + 1, model.depth + 1), final_layer=True)
        trainer.reset_optimizer()  # a fresh AdamW: no moments carried over from phase 1
        trainer.reset_ema()
        self.transitioned = True

    def state_dict(self):
        return {"transitioned": torch.tensor(int(self.transitioned))}

    def load_state_dict(self, state):
        self.transitioned = bool(int(state["transitioned"])) if "transitioned" in state else self.transitioned
