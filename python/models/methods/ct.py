"""CT: consistency training on the DiT backbone (ACT's consistency part; CM, iCT and ECT's options).

EDM noise x_sigma = x + sigma z, sigma in [sigma_min, sigma_max] = [0.002, 80], sigma_data 0.5, the
consistency parameterisation with sigma_min (so f(x, sigma_min) = x exactly):
    f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), y)
    c_skip = sd^2 / ((s - s_min)^2 + sd^2),  c_out = (s - s_min) sd / sqrt(sd^2 + s^2),  c_in = 1 / sqrt(s^2 + sd^2)
The Karras grid of N(k) points (rho 7), with N(k) = round(sqrt(k / K (s1^2 - s0^2) + s0^2)) growing
from s0 = 2 to s1 over the K = --steps of the run's start (kept in the checkpoint), and the target network's decay mu(k) =
exp(s0 ln mu0 / (N(k) - 1)), mu0 = 0.9. Per sample an index i: the online net at t_{i+1}, the target
net (no grad) at t_i, the same z; the distance pseudo-Huber (iCT: sqrt(||a - b||^2 + c^2) - c,
c = 0.00054 sqrt(dim)), L2, or LPIPS from a local VGG16 file (lpips_distance.py; ACT's release uses it). The target net is the method's own EMA (updated before each step from
the weights the last step produced); the trainer's evaluation EMA is separate and is what samples.
The online and the target forward drop the same labels (one draw per step, as CM, iCT and ECT do;
`--ct-label-dropout independent` draws twice). Options from iCT: the pair weight 1 / (t_{i+1} - t_i)
(`--ct-weighting ict`) and the discretised lognormal choice of i (`--ct-pair-sampling lognormal`,
P_mean -1.1, P_std 2.0). The generator's AdamW uses betas (0, 0.99), as ACT's release steps it
(generator_optimizer; `--adam-betas` overrides).

Noise conditioning: c_noise = 250 ln(sigma) by default at DiT widths (CM's 1000 * 0.25 ln sigma):
over [0.002, 80] it spans about 2650, the range DiT's sinusoidal time embedder (max period 10^4) was
built for with t in [0, 1000); `--ct-noise-cond raw` (ACT's raw sigma) and `ect` (ECT's ln(sigma) / 4,
spanning [-1.6, 1.1], close to the [0, 1] the SiT-trained embedder sees) are options, and ect is the
default for the tiny models, where it measured better (digits FD 67.6 vs 124.5 with cm, one run each).

Sampling: one step f(sigma_max z, sigma_max); two steps re-noise that to tau = 0.821 and apply f
again. The trainer's evaluation reports both (fd / fd_2step).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..metrics.lpips_distance import LPIPSDistance
from ..objectives.prediction import mean_prediction
from .base import ConfigError, Method, draw_label_dropout
from ..options import TrainOptions, add_options, opt, read_options
from .registry import register_method

NOISE_COND = {"cm": lambda s: 250.0 * torch.log(s), "raw": lambda s: s, "ect": lambda s: torch.log(s) / 4}


@dataclass
class CTOptions:
    ct_sigma_min: float = opt(0.002, "the smallest sigma of the grid (f(x, sigma_min) = x)")
    ct_sigma_max: float = opt(80.0, "the largest sigma of the grid (one-step sampling starts there)")
    ct_sigma_data: float = opt(0.5, "sigma_data of the CM scalings")
    ct_rho: float = opt(7.0, "rho of the Karras grid")
    ct_s0: int = opt(2, "grid points at the start (N grows s0 -> s1)")
    ct_s1: int | None = opt(None, "grid points at the end; default CIFAR's 150 for widths >= 384, 10 for the tiny models "
                                  "(measured on digits: with 150 a 1000-step run learns nothing)", type=int)
    ct_mu0: float | None = opt(None, "target EMA decay at N = s0; default 0.9 (CM) for widths >= 384, 0 for the tiny "
                                     "models (iCT's target: the online weights without grad)", type=float)
    ct_distance: str = opt("pseudo_huber", "pseudo-Huber (iCT), squared L2, or LPIPS (VGG16, ACT's release; needs "
                                           "--lpips-vgg and the lpips extra). Caution: LPIPS is an ImageNet-feature "
                                           "distance, and training on it can flatter an ImageNet-feature FID "
                                           "(Inception) without better samples",
                           choices=("pseudo_huber", "l2", "lpips"))
    lpips_vgg: str | None = opt(None, "LOCAL torchvision VGG16 state dict (official key layout, e.g. "
                                      "vgg16-397923af.pth) for --ct-distance lpips; nothing is downloaded (the LPIPS "
                                      "heads ship in the lpips wheel)", type=str, metavar="PATH")
    lpips_size: int = opt(224, "images are resized bilinearly to this square size before LPIPS (ACT's 224; >= 32, "
                               "since VGG16 pools 4 times; 1-channel images are repeated to 3)")
    ct_noise_cond: str | None = opt(None, "what the time embedder sees: cm = 250 ln(sigma), raw = sigma, ect = "
                                          "ln(sigma)/4; default cm for widths >= 384, ect for the tiny models (measured "
                                          "better on digits)", type=str, choices=tuple(NOISE_COND))
    ct_tau: float = opt(0.821, "the two-step sampler's intermediate sigma")
    ct_total_steps: int | None = opt(None, "K of the N(k) schedule; default --steps of the run's start (kept on resume)",
                                     type=int)
    ct_weighting: str = opt("uniform", "per-pair loss weight: 1, or iCT's lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)",
                            choices=("uniform", "ict"))
    ct_pair_sampling: str = opt("uniform", "the pair index i: uniform over the N - 1 pairs, or iCT's discretised "
                                           "lognormal p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - "
                                           "erf((ln sigma_i - P_mean) / (sqrt 2 P_std))",
                                choices=("uniform", "lognormal"))
    ct_p_mean: float = opt(-1.1, "P_mean of --ct-pair-sampling lognormal")
    ct_p_std: float = opt(2.0, "P_std of --ct-pair-sampling lognormal")
    ct_label_dropout: str = opt("shared", "the online and the target forward drop the same labels (one draw, as CM, "
                                          "iCT and ECT) or draw each their own", choices=("shared", "independent"))


@register_method("ct")
class CT(Method):
    """Consistency training: online net at t_{i+1} against its target EMA at t_i, same noise."""

    owns_objective = True

    @staticmethod
    def add_args(group) -> None:
        add_options(group, CTOptions)

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        if model is None:
            raise ConfigError("ct needs the backbone (its target copy is made from it)")
        o = read_options(CTOptions, args)
        self.s_min, self.s_max = float(o.ct_sigma_min), float(o.ct_sigma_max)
        self.sd, self.rho = float(o.ct_sigma_data), float(o.ct_rho)
        # The paper's grid (150), target decay (0.9) and CM conditioning are for the long runs they
        # were tuned on; below width 384 (the CPU models) s1 10, iCT's mu0 0 and ECT's ln(sigma)/4
        # (docs/results.md, "CT and ACT").
        paper = model is not None and model.hidden_size >= 384
        self.s0 = int(o.ct_s0)
        self.s1 = int(o.ct_s1 or (150 if paper else 10))
        mu0 = o.ct_mu0
        self.mu0 = float((0.9 if paper else 0.0) if mu0 is None else mu0)
        self.distance = o.ct_distance
        self.lpips, self.lpips_vgg, self.lpips_size = None, o.lpips_vgg, int(o.lpips_size)
        if self.distance == "lpips" and not self.lpips_vgg:
            raise ConfigError("--ct-distance lpips needs --lpips-vgg PATH (a local VGG16 weights file)")
        self.noise_cond = o.ct_noise_cond or ("cm" if paper else "ect")
        self.cond = NOISE_COND[self.noise_cond]
        self.tau = float(o.ct_tau)
        self.weighting, self.pair_sampling = o.ct_weighting, o.ct_pair_sampling
        self.p_mean, self.p_std = float(o.ct_p_mean), float(o.ct_p_std)
        self.label_dropout = o.ct_label_dropout
        for flag, v, ok in (("--ct-weighting", self.weighting, ("uniform", "ict")),
                            ("--ct-pair-sampling", self.pair_sampling, ("uniform", "lognormal")),
                            ("--ct-label-dropout", self.label_dropout, ("shared", "independent"))):
            if v not in ok:
                raise ConfigError(f"{flag} must be one of {ok}, got {v!r}")
        if not (self.p_std > 0 and math.isfinite(self.p_std) and math.isfinite(self.p_mean)):
            raise ConfigError(f"need a finite --ct-p-mean and --ct-p-std > 0, got {self.p_mean}, {self.p_std}")
        total = o.ct_total_steps or read_options(TrainOptions, args).steps
        if not total:
            raise ConfigError("ct's N(k) schedule needs its length: --ct-total-steps, or the trainer's --steps")
        self.total_steps = int(total)
        if not 0 < self.s_min < self.tau < self.s_max:
            raise ConfigError(f"need 0 < --ct-sigma-min < --ct-tau < --ct-sigma-max, got {self.s_min}, {self.tau}, "
                              f"{self.s_max}")
        if not 2 <= self.s0 <= self.s1:
            raise ConfigError(f"need 2 <= --ct-s0 <= --ct-s1, got {self.s0}, {self.s1}")
        if not 0 <= self.mu0 < 1:
            raise ConfigError(f"--ct-mu0 must lie in [0, 1), got {self.mu0}")
        self.backbone = model
        self.target = copy.deepcopy(model).requires_grad_(False)

    # --- schedules --------------------------------------------------------------------------------
    def num_scales(self, k: int) -> int:
        """N(k) = round(sqrt(k / K (s1^2 - s0^2) + s0^2))."""
        frac = min(max(k, 0), self.total_steps) / max(self.total_steps, 1)
        return int(round(math.sqrt(frac * (self.s1 ** 2 - self.s0 ** 2) + self.s0 ** 2)))

    def target_decay(self, k: int) -> float:
        """mu(k) = exp(s0 ln mu0 / (N(k) - 1)); 0 for mu0 = 0 (iCT)."""
        if self.mu0 == 0:
            return 0.0
        return math.exp(self.s0 * math.log(self.mu0) / (self.num_scales(k) - 1))

    def sigmas(self, n: int, device=None) -> torch.Tensor:
        """The Karras grid, ascending: t_1 = sigma_min ... t_n = sigma_max."""
        i = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
        a, b = self.s_min ** (1 / self.rho), self.s_max ** (1 / self.rho)
        return (a + i * (b - a)) ** self.rho

    def pair_probs(self, grid: torch.Tensor) -> torch.Tensor:
        """(N - 1,) float64 probabilities of the pair index i (online at grid[i + 1], target at grid[i])."""
        n = grid.numel() - 1
        if self.pair_sampling == "uniform":
            return torch.full((n,), 1.0 / n, dtype=torch.float64, device=grid.device)
        cdf = torch.erf((grid.log() - self.p_mean) / (math.sqrt(2.0) * self.p_std))
        p = cdf[1:] - cdf[:-1]
        return p / p.sum()

    def pair_weight(self, t_hi: torch.Tensor, t_lo: torch.Tensor) -> torch.Tensor:
        """(B,) float64 loss weight per pair: 1, or iCT's 1 / (sigma_{i+1} - sigma_i)."""
        if self.weighting == "uniform":
            return torch.ones_like(t_hi, dtype=torch.float64)
        return 1.0 / (t_hi.to(torch.float64) - t_lo.to(torch.float64))

    def generator_optimizer(self) -> dict:
        # ACT's release steps the generator with (R)Adam betas (0, 0.99); with (0.9, 0.999) CT and ACT
        # diverge at the small sigmas (docs/results.md, "CT and ACT").
        return {"betas": (0.0, 0.99)}

    def load_lpips(self):
        """Build the LPIPS network from --lpips-vgg once. Not in __init__: effkernels-sample rebuilds
        the method from a checkpoint's options and never needs the distance (or the VGG file)."""
        if self.lpips is None and self.distance == "lpips":
            self.lpips = LPIPSDistance(self.lpips_vgg, size=self.lpips_size)
        return self.lpips

    def attach(self, trainer) -> None:
        self.load_lpips()  # training: a missing or wrong --lpips-vgg file fails before the first step

    # --- the consistency function ------------------------------------------------------------------
    def f(self, net, x: torch.Tensor, sigma: torch.Tensor, y, force_drop_ids=None) -> torch.Tensor:
        """c_skip x + c_out F(c_in x, c_noise, y), sigma (B,): f(x, sigma_min) = x exactly. force_drop_ids
        (B,): the labels dropped to the null class (None: the backbone draws, in training mode)."""
        s = sigma.to(torch.float64)
        # sigma_min rounded as sigma was (float32 0.002 is not float64 0.002): else s - s_min is
        # ~1e-10 at the boundary and c_out F leaks into f(x, sigma_min), which must equal x exactly.
        s_min = float(torch.tensor(self.s_min, dtype=sigma.dtype))
        c_skip = self.sd ** 2 / ((s - s_min) ** 2 + self.sd ** 2)
        c_out = (s - s_min) * self.sd / (self.sd ** 2 + s ** 2).sqrt()
        c_in = 1 / (s ** 2 + self.sd ** 2).sqrt()
        view = (-1,) + (1,) * (x.dim() - 1)
        kw = {} if force_drop_ids is None else {"force_drop_ids": force_drop_ids}
        out = net(x * c_in.view(view).to(x.dtype), self.cond(s).to(torch.float32), y, **kw)
        out = mean_prediction(out[0] if isinstance(out, tuple) else out, x)
        return c_skip.view(view).to(x.dtype) * x + c_out.view(view).to(x.dtype) * out

    def dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per sample: pseudo-Huber sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim), ||a - b||^2, or
        LPIPS(a, clip(b)) (lpips_distance.py)."""
        if self.distance == "lpips":
            self.load_lpips()
            if next(self.lpips.parameters()).device != a.device:
                self.lpips.to(a.device)  # frozen and rebuilt from its file: not part of the checkpoint
            return self.lpips(a, b)
        sq = (a.float() - b.float()).pow(2).flatten(1).sum(1)
        if self.distance == "l2":
            return sq
        c = 0.00054 * math.sqrt(a[0].numel())
        return (sq + c * c).sqrt() - c

    def objective(self, model, batch, step, options):
        if options:
            raise ConfigError(f"ct takes no forward options from other methods, got {sorted(options)}")
        x, y, g = batch["x"], batch["y"], batch.get("generator")
        dev = g.device if g is not None else x.device
        n = self.num_scales(step)
        grid = self.sigmas(n, device=x.device)
        if self.pair_sampling == "uniform":
            i = torch.randint(0, n - 1, (x.shape[0],), generator=g, device=dev).to(x.device)
        else:
            i = torch.multinomial(self.pair_probs(grid).to(dev), x.shape[0], replacement=True, generator=g).to(x.device)
        z = batch.get("noise")
        z = torch.randn(x.shape, generator=g, device=dev).to(x) if z is None else z
        t_hi, t_lo = grid[i + 1], grid[i]
        drop = draw_label_dropout(self.backbone, batch) if self.label_dropout == "shared" else None
        online = self.f(model, x + t_hi.view(-1, 1, 1, 1).to(x.dtype) * z, t_hi, y, drop)
        with torch.no_grad():
            self.target.train(self.backbone.training)  # the same label dropout regime, no grad
            target = self.f(self.target, x + t_lo.view(-1, 1, 1, 1).to(x.dtype) * z, t_lo, y, drop)
        d = self.dist(online, target) * self.pair_weight(t_hi, t_lo).to(torch.float32)
        return {"loss": d.mean(), "loss_per_sample": d.detach(), "distance_per_sample": d, "ct_scales": torch.tensor(float(n)),
                "pred": online, "sigma": t_hi, "noise": z, "options": {}}

    def before_step(self, trainer, step):
        """target <- mu(k) target + (1 - mu(k)) online, with the weights step k - 1 produced."""
        if step == 0:
            return
        mu = self.target_decay(step - 1)
        with torch.no_grad():
            tp, op = list(self.target.parameters()), [p.detach() for p in self.backbone.parameters()]
            torch._foreach_lerp_(tp, op, 1 - mu)

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, models, y, noise, *, steps: int = 1, generator=None, clamp=None, **_):
        """One step f(sigma_max z, sigma_max); with steps=2 re-noised to tau and f applied again."""
        if steps not in (1, 2):
            raise ConfigError(f"ct samples in 1 or 2 steps, got steps={steps}")
        net = models["backbone"]
        b = noise.shape[0]
        x = self.f(net, noise * self.s_max, torch.full((b,), self.s_max, device=noise.device), y)
        if steps == 2:
            z = torch.randn(noise.shape, generator=generator,
                            device=generator.device if generator is not None else noise.device).to(noise)
            x = x + math.sqrt(self.tau ** 2 - self.s_min ** 2) * z
            x = self.f(net, x, torch.full((b,), self.tau, device=noise.device), y)
        return x.clamp(*clamp) if clamp is not None else x

    def eval_samplers(self) -> dict:
        return {"": {"steps": 1}, "_2step": {"steps": 2}}

    def state_dict(self):
        return {"target": self.target.state_dict(), "total_steps": torch.tensor(self.total_steps)}

    def load_state_dict(self, state):
        self.target.load_state_dict(state["target"])
        # The schedule's K stays the one the run started with: a resume that extends --steps
        # continues at N = s1 instead of re-stretching the grid under the trained model.
        self.total_steps = int(state.get("total_steps", self.total_steps))
