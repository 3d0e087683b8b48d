"""TREAD: token routing.

Per sample a random fraction `ratio` of the tokens is routed around blocks start..end and re-enters
unchanged after `end`; the processed rest run those blocks. The loss is SiT's flow objective on all
tokens. Routes are drawn here, before the backbone's forward (one draw per route from the step's
generator), so a compiled backbone sees plain index tensors. Routing is on in training only:
evaluation and sampling run dense unless --route-eval forces it. Blocks are numbered 1..depth and a
route START:END runs blocks START..END inclusive (the release's 0-based 2:8 is our 3:9). The
paper's dense fine-tune stage is this method resumed with --route-ratio 0: no routing at all, the
ratios given in --route START:END:RATIO included (the routes are still checked against the model).

Per-sample budgets (beyond the paper): --route-ratio-range A:B draws every route's ratio per sample,
uniform in [A, B], so samples process different token counts; the processed tokens are packed
without padding (effkernels.nn.routing.TokenPack) and the routed blocks run on the packed rows
(varlen attention within each sample). The loss is unchanged: the flow objective on all tokens of
every sample, each sample weighted 1/B as with a fixed ratio.

Sparse guidance (optional, at sampling): two conditional forwards with forced routing rates, strong
(--sparse-guidance-strong, 0.3) and weak (--sparse-guidance-weak, 0.7) over the same blocks,
combined v = v_weak + s (v_strong - v_weak), s = 1.5 (the follow-up paper's definition; the released
code's unconditional branches are a defect not copied). effkernels-sample overrides both rates.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from effkernels import ops
from effkernels.nn.routing import TokenPack, check_ratio_range, draw_ratios, keep_count

from ..backbone.network import Route
from ..objectives.prediction import mean_prediction, model_output
from ..sampling.samplers import sample
from .base import ConfigError, Method
from ..options import add_options, opt, read_options
from .registry import register_method


def default_routes(depth: int, ratio: float) -> list[Route]:
    """The paper's placement, blocks 3..depth-3 (B/2: 3..9, XL/2: 3..25); no route at ratio 0."""
    if ratio == 0:
        return []
    if depth < 6:
        raise ConfigError(f"the default TREAD placement (blocks 3..depth-3) needs depth >= 6, got {depth}; "
                          "give --route START:END")
    return [Route(3, depth - 3, ratio)]


def parse_route(spec: str, ratio: float) -> Route:
    """'START:END[:RATIO]' -> Route (RATIO defaults to `ratio`)."""
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError("expected START:END[:RATIO]")
        start, end = int(parts[0]), int(parts[1])
        r = float(parts[2]) if len(parts) == 3 else ratio
        return Route(start, end, r)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--route {spec!r}: {e}") from None


def check_guidance_rate(flag: str, rate, num_tokens: int | None = None) -> float:
    """A sparse-guidance routing rate: a number in [0, 1) that leaves a token to process."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"{flag} must lie in [0, 1), got {rate!r}")
    if num_tokens is not None:
        try:
            keep_count(num_tokens, float(rate))
        except ValueError as e:
            raise ConfigError(f"{flag} {rate}: {e}") from None
    return float(rate)


def parse_ratio_range(option: str, spec) -> tuple[float, float] | None:
    """'A:B' -> (A, B) with 0 <= A <= B < 1, or None for None; errors name `option`."""
    if spec is None:
        return None
    try:
        parts = str(spec).split(":")
        if len(parts) != 2:
            raise ValueError(f"expected A:B, got {spec!r}")
        lo, hi = float(parts[0]), float(parts[1])
        return check_ratio_range(option, lo, hi)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(option) else f"{option} {spec!r}: {msg}") from None


@dataclass
class TREADOptions:
    route_ratio: float = opt(0.5, "fraction of tokens routed around the blocks (tread); without --route they are blocks "
                                  "3..depth-3, the paper's placement; 0 = dense (the fine-tune stage): no route runs, "
                                  "whatever RATIO a --route gives")
    route: list | None = opt(None, "route blocks START..END at RATIO (default --route-ratio); blocks are 1-based and "
                                   "START..END inclusive (the TREAD release's 0-based 2:8 is our 3:9); repeatable, "
                                   "sorted and non-overlapping, each drawn independently",
                             type=str, action="append", metavar="START:END[:RATIO]")
    route_ratio_range: str | None = opt(None, "per-sample budgets: every route draws each sample's ratio uniformly in "
                                              "[A, B] (0 <= A <= B < 1) instead of --route-ratio, so samples keep "
                                              "different token counts, packed without padding; --route then takes "
                                              "START:END only", type=str, metavar="A:B")
    route_unsorted: bool = opt(False, "processed tokens in random order (default: kept in raster order, for backbones "
                                      "whose blocks care about order)", action="store_true")
    route_eval: bool = opt(False, "route during evaluation and sampling too (default: dense)", action="store_true")
    sparse_guidance_strong: float = opt(0.3, "sparse guidance (effkernels-sample --sparse-guidance): the routing rate "
                                             "forced on the strong branch, in [0, 1) (the paper: 0.3)", metavar="RATE")
    sparse_guidance_weak: float = opt(0.7, "sparse guidance: the routing rate forced on the weak branch, in [0, 1) (the "
                                           "paper: 0.7)", metavar="RATE")


@register_method("tread")
class TREAD(Method):
    """Routed blocks in training, the flow objective on every token, dense evaluation."""

    token_plan = ("routes",)

    @staticmethod
    def add_args(group) -> None:
        add_options(group, TREADOptions)

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        o = read_options(TREADOptions, args)
        ratio = float(o.route_ratio)
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"--route-ratio must lie in [0, 1), got {ratio}")
        dense = ratio == 0.0  # the dense fine-tune: no route runs, whatever the specs' own ratios
        specs = o.route
        depth = model.depth if model is not None else None
        self.ratio_range = parse_ratio_range("--route-ratio-range", o.route_ratio_range)
        if self.ratio_range is not None and dense:
            raise ConfigError("--route-ratio 0 (dense, no routing) contradicts --route-ratio-range "
                              f"{self.ratio_range[0]}:{self.ratio_range[1]}: give one of them")
        if self.ratio_range is not None:
            # The routes' ratio is then a label (the range's top); the draw decides each sample's.
            ratio = self.ratio_range[1]
            bad = [s for s in specs or () if len(s.split(":")) == 3]
            if bad:
                raise ConfigError(f"--route {bad[0]!r}: with --route-ratio-range give START:END only "
                                  "(every route draws its per-sample ratios from the range)")
        if specs:
            self.routes = [parse_route(s, ratio) for s in specs]
        else:
            self.routes = default_routes(depth, ratio) if depth is not None else []
        if model is not None:
            try:
                model._check_plan((), None, self.routes)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"--route: {e}") from None
        self.routes = [] if dense else [r for r in self.routes if r.ratio > 0]
        self.num_tokens = model.num_patches if model is not None else None
        self.sg_strong = check_guidance_rate("--sparse-guidance-strong", o.sparse_guidance_strong,
                                             self.num_tokens)
        self.sg_weak = check_guidance_rate("--sparse-guidance-weak", o.sparse_guidance_weak,
                                           self.num_tokens)
        if self.ratio_range is not None and self.num_tokens is not None:
            try:
                keep_count(self.num_tokens, self.ratio_range[1])
            except ValueError as e:
                raise ConfigError(f"--route-ratio-range: {e}") from None
        self.sort = not o.route_unsorted
        self.route_eval = bool(o.route_eval)

    def draw(self, batch: int, generator: torch.Generator | None, device) -> list[Route]:
        """Every route with its own keep index (batch, K), drawn now from `generator`; with a ratio
        range, its own per-sample ratios and a TokenPack of the counts they give (K_b = N - round(N r_b)).
        Drawn by draw_route or TokenPack, so forward skips the index check (checked=True)."""
        n = self.num_tokens
        if self.ratio_range is None:
            return [replace(r, idx=ops.draw_route(batch, n, r.keep(n), generator=generator, device=device,
                                                  sort=self.sort), checked=True)
                    for r in self.routes]
        out = []
        for r in self.routes:
            counts = [keep_count(n, q) for q in draw_ratios(batch, *self.ratio_range, generator=generator)]
            out.append(replace(r, idx=TokenPack.draw(counts, n, generator=generator, device=device, sort=self.sort)))
        return out

    def forward_options(self, model, batch, step):
        if not self.routes or not model.training:
            return {}
        return {"routes": self.draw(batch["x"].shape[0], batch.get("generator"), batch["x"].device)}

    @torch.no_grad()
    def sample(self, models, y, noise, *, sparse_guidance: float | None = None,
               sparse_guidance_strong: float | None = None, sparse_guidance_weak: float | None = None, **opts):
        """sparse_guidance: the scale s of sparse guidance (None: off); its strong / weak routing rates
        default to this run's --sparse-guidance-strong / --sparse-guidance-weak."""
        model = models["backbone"]
        if sparse_guidance is None and (sparse_guidance_strong is not None or sparse_guidance_weak is not None):
            raise ConfigError("--sparse-guidance-strong/--sparse-guidance-weak go with --sparse-guidance")
        if sparse_guidance is not None:
            if not self.routes:
                raise ConfigError("sparse guidance needs routes (this run has --route-ratio 0 or no route)")
            strong = self.sg_strong if sparse_guidance_strong is None else sparse_guidance_strong
            weak = self.sg_weak if sparse_guidance_weak is None else sparse_guidance_weak
            model = SparseGuided(model, self.routes, sparse_guidance,
                                 strong=check_guidance_rate("--sparse-guidance-strong", strong, self.num_tokens),
                                 weak=check_guidance_rate("--sparse-guidance-weak", weak, self.num_tokens))
        elif self.route_eval and self.routes:
            model = _Routed(model, self.routes)
        return sample(model, y, noise=noise, **opts)


class _Routed(nn.Module):
    """The backbone with routes forced on (a fresh draw per call, from the global RNG)."""

    def __init__(self, model, routes):
        super().__init__()
        self.model, self.routes = model, list(routes)
        self.num_classes = model.num_classes

    def forward(self, x, t, y, **kw):
        return self.model(x, t, y, routes=self.routes, **kw)


class SparseGuided(nn.Module):
    """v = v_weak + s (v_strong - v_weak): two CONDITIONAL forwards of the same model on the same
    labels, routing `strong` (0.3) and `weak` (0.7) of the tokens over the training routes' blocks;
    each rate in [0, 1) (--sparse-guidance-strong / --sparse-guidance-weak)."""

    def __init__(self, model, routes, scale: float, *, strong: float, weak: float):
        super().__init__()
        strong = check_guidance_rate("--sparse-guidance-strong", strong)
        weak = check_guidance_rate("--sparse-guidance-weak", weak)
        self.model, self.scale = model, float(scale)
        self.strong = [replace(r, ratio=strong, idx=None) for r in routes]
        self.weak = [replace(r, ratio=weak, idx=None) for r in routes]
        self.num_classes = model.num_classes

    def forward(self, x, t, y, **kw):
        v_strong = mean_prediction(model_output(self.model(x, t, y, routes=self.strong, **kw)), x)
        v_weak = mean_prediction(model_output(self.model(x, t, y, routes=self.weak, **kw)), x)
        return v_weak + self.scale * (v_strong - v_weak)
