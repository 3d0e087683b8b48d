"""The method protocol: what a training method may define, and how methods compose.

A method is a small object built by a registered factory, `factory(model, args)`, where `model` is
the backbone (a DiT) and `args` the trainer's parsed options (None in tests that build one by hand).
Subclass `Method`: every hook has a default, so a method defines only what it changes.

Hooks
  add_args(group)                   static: the method's CLI options (an argparse argument group)
  modules() -> {name: nn.Module}    trainable modules of its own (REPA's projector, MaskDiT's decoder):
                                    optimised with the backbone, inside the data-parallel wrapper,
                                    checkpointed. Names are unique across a composition.
  generator_modules                 names among modules() that belong to the sampled generator
                                    (MaskDiT's decoder): averaged by the EMA, handed to sample()
  token_plan                        the forward options this method decides ("routes", "keep_idx"):
                                    at most one method of a composition has a token plan
  forward_options(model, batch, step) -> dict
                                    the backbone's forward options this step: routes (pre-drawn
                                    indices), keep_idx, return_hidden (depths; the union is taken)
  owns_objective / objective(model, batch, step, options) -> dict
                                    the base loss and the forward's outputs: dict(loss, x_t, t, noise,
                                    pred, target, hidden, ...). Default: SiT's flow matching. At most
                                    one method of a composition sets owns_objective.
  extra_losses(out, model, batch, step) -> {name: scalar}
                                    weighted terms added to the loss (REPA's alignment); each is logged.
                                    out["options"] holds the forward options used (keep_idx: the
                                    hidden states are the kept tokens only; routes: full sequences;
                                    a TokenPack keep_idx: packed rows (T, D), weighted per sample by
                                    keep_idx.token_weights(); set takes_packed_hidden when handled)
  generator_optimizer() -> dict     the generator optimizer's hyper-parameters this method needs, as
                                    AdamW keywords among OPTIMIZER_KEYS (CT/ACT: betas (0, 0.99));
                                    {}: the trainer's (0.9, 0.999). --adam-betas overrides; the
                                    trainer re-applies the result after a resume
  aux_modules() -> {name: AuxModule}
                                    modules with an optimizer of their own (ACT's discriminator):
                                    their own AdamW, gradient averaging, clipping and checkpoint
  aux_loss(name, module, batch, step, out) -> dict(loss=...)
                                    what that optimizer minimises, run after the main step; `out` is
                                    the main step's result (detach what you take from it)
  sample(models, y, noise, **opts) -> images
                                    generation for evaluation and effkernels-sample; models holds the
                                    EMA "backbone" and the EMA generator modules. Default: the ODE
                                    sampler of effkernels.models.sampling.samplers on the backbone.
  eval_samplers() -> {suffix: opts}  the samplers the trainer's evaluation reports, each as keyword
                                    overrides for sample(); metrics get the suffix (CT: "" = one
                                    step, "_2step" = two). Default {"": {}}.
  attach(trainer)                   called once, after the trainer is built (the trainer API below)
  before_step(trainer, step)        called by the trainer at the start of every training step, on
                                    every rank (ERW's phase transition: re-initialise, reset the
                                    optimizer and the EMA, checkpoint)
  state_dict() / load_state_dict()  state that is not in a module (schedules, counters)
  batch_keys                        extra per-sample arrays the data set must carry; make_batch passes
                                    them in `batch` under these names
  find_unused_parameters            some trainable parameters get no gradient on some steps (tells
                                    DistributedDataParallel to look for them)
  teacher_ema                       the decay the method's paper gives the trainer's EMA when the EMA is
                                    part of the method (SRA's teacher: 0.9999 from step 0); the trainer
                                    says so at start when --ema / --ema-no-warmup differ. None: no claim

`batch` is dict(x=(B, C, H, W), y=(B,), generator=torch.Generator seeded by (seed, step, rank), and
the batch_keys arrays); tests may add t and noise to fix the draws.

The trainer a method is given (attach, before_step) offers exactly this, and a method uses nothing else
(tests/test_methods.py checks the methods' source):
  device, ds, model, args           read only: the device, the data set, the live backbone, the options
  ema_model()                       the EMA backbone the trainer updates after every step (SRA's teacher)
  steps_per_epoch()                 optimizer steps per pass over the data (the last partial batch dropped)
  save_named(name)                  write a full checkpoint <out>/<name> (every rank takes part)
  reset_optimizer()                 forget the generator optimizer's moments (a fresh AdamW)
  reset_ema()                       the EMA := the live generator's weights

Composition: `--method a+b` builds a `Composite` of the parts. Its loss takes the merged forward
options, runs the one objective, and adds every part's extra losses, so e.g. TREAD's routes (a token
plan) and REPA's alignment term (a hidden depth and an extra loss) combine without either knowing
the other. Conflicts (two token plans, two objectives, two samplers, a name used twice) are a
ConfigError when the composition is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..objectives.flow import FlowMatching
from ..sampling.samplers import sample

# The backbone's forward options that decide which tokens it sees (a token plan).
TOKEN_OPTIONS = ("routes", "keep_idx")

# The generator optimizer's hyper-parameters a method may ask for (AdamW keywords).
OPTIMIZER_KEYS = ("betas", "eps", "weight_decay")


class ConfigError(ValueError):
    """A setting that argparse cannot check alone (it depends on the data, the checkpoint, the world
    size or another method of the composition)."""


@dataclass
class AuxModule:
    """A module stepped by an optimizer of its own (AdamW with these settings, fused where available)."""
    module: nn.Module
    lr: float = 2e-4
    betas: tuple = (0.0, 0.99)
    weight_decay: float = 0.0
    grad_clip: float | None = None


class Method:
    """Base class of a training method: the SiT flow-matching objective and no-op hooks."""

    generator_modules: tuple[str, ...] = ()
    token_plan: tuple[str, ...] = ()
    owns_objective: bool = False
    batch_keys: tuple[str, ...] = ()
    find_unused_parameters: bool = False
    takes_packed_hidden: bool = False
    teacher_ema: float | None = None

    def __init__(self, model: nn.Module | None = None, args=None):
        self.flow = FlowMatching()

    @staticmethod
    def add_args(group) -> None:
        """Add this method's CLI options to `group` (an argparse argument group)."""

    # --- parts --------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {}

    def aux_modules(self) -> dict[str, AuxModule]:
        return {}

    def generator_optimizer(self) -> dict:
        return {}

    # --- the loss ----------------------------------------------------------------------------------
    def forward_options(self, model, batch: dict, step: int) -> dict:
        return {}

    def objective(self, model, batch: dict, step: int, options: dict) -> dict:
        """SiT's flow matching on the (possibly routed) backbone; hidden states under "hidden"."""
        return self.flow.loss(model, batch["x"], batch["y"], batch.get("generator"),
                              t=batch.get("t"), noise=batch.get("noise"), **options)

    def extra_losses(self, out: dict, model, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return {}

    def aux_loss(self, name: str, module: nn.Module, batch: dict, step: int, out: dict) -> dict:
        raise ConfigError(f"{type(self).__name__} declares aux module {name!r} but defines no aux_loss")

    def loss(self, model, batch: dict, step: int) -> dict:
        """The whole loss of this method alone (a Composite of one)."""
        return Composite([(type(self).__name__, self)]).loss(model, batch, step)

    # --- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, models: dict, y, noise, **opts) -> torch.Tensor:
        return sample(models["backbone"], y, noise=noise, **opts)

    def eval_samplers(self) -> dict:
        return {"": {}}

    # --- lifecycle -----------------------------------------------------------------------------------
    def attach(self, trainer) -> None:
        pass

    def before_step(self, trainer, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ConfigError(f"{type(self).__name__} has no state to load, got keys {sorted(state)}")


def draw_label_dropout(backbone, batch: dict) -> torch.Tensor | None:
    """force_drop_ids (B,) drawn from the step's generator with the backbone's label-dropout rate, or
    None when it drops nothing (eval mode, rate 0). A method that runs the labels through two
    networks (MaskDiT's encoder and decoder, SRA's student and teacher) draws them once, here."""
    emb = backbone.y_embedder
    if not (backbone.training and emb.dropout_prob > 0):
        return None
    x, g = batch["x"], batch.get("generator")
    u = torch.rand(x.shape[0], generator=g, device=g.device if g is not None else x.device).to(x.device)
    return (u < emb.dropout_prob).long()


def _overrides(part, name: str) -> bool:
    """Whether `part` defines hook `name` itself instead of inheriting Method's default."""
    return getattr(type(part), name, None) is not getattr(Method, name)


def merge_options(named_options) -> dict:
    """Union of return_hidden depths; every other option from exactly one method."""
    merged, owner, depths = {}, {}, set()
    for name, opts in named_options:
        for k, v in opts.items():
            if k == "return_hidden":
                depths.update((v,) if isinstance(v, int) else v)
            elif k in merged:
                raise ConfigError(f"methods {owner[k]!r} and {name!r} both set the forward option {k!r}")
            else:
                merged[k], owner[k] = v, name
    if depths:
        merged["return_hidden"] = tuple(sorted(depths))
    return merged


class Composite(Method):
    """Several methods trained as one: merged forward options, one objective, summed extra losses."""

    def __init__(self, parts):
        self.parts = list(parts)  # [(name, method)]
        if not self.parts:
            raise ConfigError("a composition needs at least one method")
        names = [n for n, _ in self.parts]
        if len(set(names)) != len(names):
            raise ConfigError(f"method listed twice in {'+'.join(names)}")
        for n, p in self.parts:
            if isinstance(p, Composite):
                raise ConfigError(f"{n!r} is already a composition")
            if _overrides(p, "loss"):
                if len(self.parts) > 1:
                    raise ConfigError(f"method {n!r} defines the whole loss itself and cannot be combined; "
                                      "define objective/forward_options/extra_losses to compose")
        self._plan = self._token_planner()
        for n, p in self.parts:
            # A packed keep index (MaskDiT's --mask-ratio-range) gives hidden states as (T, D) rows
            # with a different count per sample; an extra loss must gather its target by the pack
            # and weigh each sample's rows by its count (REPA, ERW and SRA do: takes_packed_hidden),
            # else it would fail mid-step or weigh samples wrongly.
            readers = [m for m, q in self.parts if m != n and _overrides(q, "extra_losses")
                       and not getattr(q, "takes_packed_hidden", False)]
            if getattr(p, "packs_keep_idx", False) and readers:
                raise ConfigError(f"{n!r} with a per-sample ratio range packs each sample's kept tokens; "
                                  f"{readers} do not take packed hidden states yet: use a fixed ratio")
        objectives = [(n, p) for n, p in self.parts if p.owns_objective]
        if len(objectives) > 1:
            raise ConfigError(f"methods {objectives[0][0]!r} and {objectives[1][0]!r} both define the objective")
        self.primary = objectives[0][1] if objectives else self.parts[0][1]
        samplers = [(n, p) for n, p in self.parts if _overrides(p, "sample")]
        if len(samplers) > 1:
            raise ConfigError(f"methods {samplers[0][0]!r} and {samplers[1][0]!r} both define sampling")
        self.sampler = samplers[0][1] if samplers else self.primary
        self._modules = self._collect(lambda p: p.modules(), "module")
        self._aux = self._collect(lambda p: p.aux_modules(), "aux module")
        self._aux_owner = {k: p for n, p in self.parts for k in p.aux_modules()}
        self.generator_modules = tuple(g for _, p in self.parts for g in p.generator_modules)
        for g in self.generator_modules:
            if g not in self._modules:
                raise ConfigError(f"generator module {g!r} is not among the method's modules {sorted(self._modules)}")
        self.batch_keys = tuple(dict.fromkeys(k for _, p in self.parts for k in p.batch_keys))
        self.find_unused_parameters = any(p.find_unused_parameters for _, p in self.parts)
        self.teacher_ema = next((p.teacher_ema for _, p in self.parts if p.teacher_ema is not None), None)
        self.token_plan = self._plan

    def _token_planner(self):
        """At most one method decides which tokens the backbone sees (routes, or a keep index)."""
        planners = [(n, p) for n, p in self.parts if p.token_plan]
        if len(planners) > 1:
            (a, pa), (b, pb) = planners[:2]
            raise ConfigError(f"methods {a!r} ({'/'.join(pa.token_plan)}) and {b!r} ({'/'.join(pb.token_plan)}) "
                              "both decide which tokens the backbone sees; at most one token plan per run "
                              "(TREAD and MaskDiT do not combine)")
        return tuple(planners[0][1].token_plan) if planners else ()

    def _collect(self, get, what) -> dict:
        out, owner = {}, {}
        for n, p in self.parts:
            for k, m in get(p).items():
                if k in out:
                    raise ConfigError(f"methods {owner[k]!r} and {n!r} both own a {what} named {k!r}")
                out[k], owner[k] = m, n
        return out

    @property
    def name(self) -> str:
        return "+".join(n for n, _ in self.parts)

    def modules(self):
        return dict(self._modules)

    def aux_modules(self):
        return dict(self._aux)

    def generator_optimizer(self):
        merged, owner = {}, {}
        for n, p in self.parts:
            for k, v in p.generator_optimizer().items():
                if k not in OPTIMIZER_KEYS:
                    raise ConfigError(f"method {n!r} sets the optimizer option {k!r}; known: {OPTIMIZER_KEYS}")
                if k in merged and merged[k] != v:
                    raise ConfigError(f"methods {owner[k]!r} and {n!r} need different generator optimizer {k}: "
                                      f"{merged[k]} and {v}")
                merged[k], owner[k] = v, n
        return merged

    def forward_options(self, model, batch, step):
        opts = merge_options((n, p.forward_options(model, batch, step)) for n, p in self.parts)
        for k in opts:
            if k in TOKEN_OPTIONS and k not in self._plan:
                # a method that sets a token option must declare it, so conflicts show at build time
                raise ConfigError(f"forward option {k!r} is set by a method that does not list it in token_plan")
        return opts

    def loss(self, model, batch, step):
        if len(self.parts) == 1 and _overrides(self.parts[0][1], "loss"):
            return self.parts[0][1].loss(model, batch, step)  # a method that writes its whole loss
        options = self.forward_options(model, batch, step)
        out = self.primary.objective(model, batch, step, options)
        out.setdefault("options", options)  # a term method reads e.g. keep_idx to gather its target
        terms = {}
        for n, p in self.parts:
            for k, v in p.extra_losses(out, model, batch, step).items():
                if k in out or k in terms:
                    raise ConfigError(f"method {n!r}: loss term {k!r} is already taken")
                terms[k] = v
        if terms:
            out["loss_base"] = out["loss"]
            out["loss"] = out["loss"] + sum(terms.values())
            out.update(terms)
        return out

    def aux_loss(self, name, module, batch, step, out):
        return self._aux_owner[name].aux_loss(name, module, batch, step, out)

    def sample(self, models, y, noise, **opts):
        return self.sampler.sample(models, y, noise, **opts)

    def eval_samplers(self):
        return self.sampler.eval_samplers()

    def attach(self, trainer):
        for _, p in self.parts:
            p.attach(trainer)

    def before_step(self, trainer, step):
        for _, p in self.parts:
            p.before_step(trainer, step)

    def state_dict(self):
        return {n: s for n, p in self.parts if (s := p.state_dict())}

    def load_state_dict(self, state):
        unknown = set(state) - {n for n, _ in self.parts}
        if unknown:
            raise ConfigError(f"method state for {sorted(unknown)}, which are not part of {self.name}")
        for n, p in self.parts:
            p.load_state_dict(state.get(n, {}))
