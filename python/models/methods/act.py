"""ACT: adversarial consistency training (Kong et al., kong13661/ACT) on top of CT (ct.py).

A discriminator conditioned on sigma sees clean-space images only: fakes are the online
consistency outputs f(x + t z, t) of the generator's half of the batch, reals the other half at an
independent t (one G step and one D step per iteration on disjoint real batches). Non-saturating
logistic losses. The generator minimises the per-sample mean of (1 - lambda) d_ct + lambda
softplus(-D(fake, t)): lambda = 0.3 constant (CIFAR), or `--act-lambda-schedule t-weighted`, the
ImageNet64 config of ACT's release (train_imagenet64.py there, read for its formula, not copied):
    lambda(t) = lambda_max * w(t),  w(t) = u(t) ** log2(lambda_max / lambda_mid),
    u(t) = (t^(1/rho) - sigma_min^(1/rho)) / (sigma_max^(1/rho) - sigma_min^(1/rho))  in [0, 1],
i.e. the Karras-grid index of t over N - 1 (so w does not depend on N), lambda_max = 0.6 and
lambda_mid = 0.2 there: lambda is 0.6 at sigma_max, 0.2 at the grid's middle, 0 at sigma_min (the
adversarial term matters where the one-step output is blurriest). As in that config, the same w(t)
also weights the discriminator's per-sample real and fake losses and its R1 penalty (at each
image's own t); its extra factor lambda_max on the whole discriminator loss is left out (a constant
scale of the loss, which Adam's update ignores up to its epsilon).

The discriminator is a small conv net (image-shaped inputs, cheap at every size this library trains
on the CPU; a DiT-style one would cost as much as the generator) with the backbone's sinusoidal time
embedder shifting each stage's features. Its own AdamW (weight decay 0, i.e. Adam), betas (0, 0.99),
lr 1e-4, stepped by the trainer after the generator step (methods' aux modules).

R1 (gamma 10) on augmented reals every --r1-every (16) steps: gamma / 2 E||grad||^2, unscaled as in
ACT's release (`--r1-lazy-scale` multiplies it by r1_every, StyleGAN2's lazy regularisation). Adaptive augmentation: an EMA (0.93) of R1, averaged over processes, against a
threshold moves the augmentation probability p up or down by a fixed step, clipped to [0, 1]; the
augmentation (x-flip, integer translation, brightness/contrast) is differentiable plain PyTorch and
applied to every image the discriminator sees. The released configs set the threshold so high that
p never moves. Ours (threshold 0.01, step 0.02 per R1 evaluation) was set from R1 measured on the
digits default (`effkernels-train --method act --log-every 1`): R1 grows from 0 to 0.01-0.06 over the
first 300-1000 steps, so p starts rising after about 250 steps and would need 50 evaluations (800
steps) to go from 0 to 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ddp
from ..backbone.network import TimestepEmbedder
from .base import AuxModule, ConfigError
from .ct import CT
from ..options import add_options, opt, read_options
from .registry import register_method


class Discriminator(nn.Module):
    """(B, C, H, W) clean-space images and sigma's c_noise (B,) -> one logit per image."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.t_embedder = TimestepEmbedder(2 * width)
        self.convs = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1),
                                    nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                    nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)])
        self.shift = nn.Linear(2 * width, width + 4 * width)  # per-channel shifts of the three stages
        self.out = nn.Linear(2 * width, 1)
        self.width = width

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        e = F.silu(self.t_embedder(c_noise))
        s1, s2, s3 = self.shift(e).split([self.width, 2 * self.width, 2 * self.width], dim=-1)
        h = x
        for conv, s in zip(self.convs, (s1, s2, s3)):
            h = F.silu(conv(h) + s[:, :, None, None])
        return self.out(h.mean((2, 3)))[:, 0]


def augment(x: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Differentiable augmentation, each part applied per image with probability p: x-flip,
    integer translation by up to 1/8 of the size (zero padding), brightness and contrast."""
    if p <= 0:
        return x
    b, dev = x.shape[0], x.device
    gdev = generator.device if generator is not None else dev

    def coin():
        return (torch.rand(b, generator=generator, device=gdev) < p).to(dev)

    def unif(lo, hi):
        return (lo + (hi - lo) * torch.rand(b, generator=generator, device=gdev)).to(dev)

    flip = coin().view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    h, w = x.shape[-2:]
    m = max(1, h // 8)
    shift = coin()
    dy = torch.where(shift, torch.randint(-m, m + 1, (b,), generator=generator, device=gdev).to(dev), 0)
    dx = torch.where(shift, torch.randint(-m, m + 1, (b,), generator=generator, device=gdev).to(dev), 0)
    pad = F.pad(x, (m, m, m, m))
    rows = (torch.arange(h, device=dev)[None] + m - dy[:, None]).view(b, 1, h, 1).expand(-1, x.shape[1], -1, pad.shape[-1])
    x = pad.gather(2, rows)
    cols = (torch.arange(w, device=dev)[None] + m - dx[:, None]).view(b, 1, 1, w).expand(-1, x.shape[1], h, -1)
    x = x.gather(3, cols)
    bright = torch.where(coin(), unif(-0.2, 0.2), 0.0).view(-1, 1, 1, 1)
    contrast = torch.where(coin(), unif(0.8, 1.25), 1.0).view(-1, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean + bright


@dataclass
class ACTOptions:
    act_lambda: float | None = opt(None, "adversarial weight in the generator loss (its value at sigma_max when "
                                         "t-weighted); default 0.3 constant (CIFAR), 0.6 t-weighted (ImageNet64)",
                                   type=float)
    act_lambda_schedule: str = opt("constant", "constant lambda, or ACT's ImageNet lambda(t) = lambda "
                                               "u(t)^log2(lambda/mid), u the Karras-grid position of t in [0, 1] (also "
                                               "weights D's losses and R1 per image)", choices=("constant", "t-weighted"))
    act_lambda_mid: float = opt(0.2, "t-weighted: lambda at the middle of the grid (u = 1/2); 0 < mid <= lambda")
    act_d_lr: float = opt(1e-4, "discriminator learning rate")
    act_d_width: int = opt(64, "discriminator base width")
    r1_every: int = opt(16, "R1 penalty every N steps")
    r1_lazy_scale: bool = opt(False, "multiply R1 by --r1-every (StyleGAN2's lazy regularisation; ACT's release does "
                                     "not)", action="store_true")
    r1_gamma: float = opt(10.0, "R1 weight gamma (the penalty is gamma / 2 E||grad D(real)||^2)")
    ada_target: float = opt(0.01, "R1 EMA threshold of the adaptive augmentation (above: p rises; below: p falls)")
    ada_step: float = opt(0.02, "change of p per R1 evaluation")


@register_method("act")
class ACT(CT):
    """CT's generator loss mixed with a non-saturating adversarial term; a t-conditioned discriminator."""

    @staticmethod
    def add_args(group) -> None:
        add_options(group, ACTOptions)

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        o = read_options(ACTOptions, args)
        self.schedule = o.act_lambda_schedule
        if self.schedule not in ("constant", "t-weighted"):
            raise ConfigError(f"--act-lambda-schedule must be constant or t-weighted, got {self.schedule!r}")
        lam = o.act_lambda
        self.lam = float(lam) if lam is not None else (0.3 if self.schedule == "constant" else 0.6)
        self.lam_mid = float(o.act_lambda_mid)
        if self.schedule == "t-weighted" and not 0 < self.lam_mid <= self.lam:
            raise ConfigError(f"--act-lambda-schedule t-weighted needs 0 < --act-lambda-mid <= --act-lambda, got "
                              f"{self.lam_mid} and {self.lam}")
        # the exponent log_{1/2}(mid / lambda): u = 1/2 gives lambda * (1/2)^e = mid
        self.lam_exp = math.log2(self.lam / self.lam_mid) if self.schedule == "t-weighted" else 0.0
        self.r1_every, self.r1_gamma = int(o.r1_every), float(o.r1_gamma)
        self.r1_scale = float(self.r1_every) if o.r1_lazy_scale else 1.0
        self.ada_target, self.ada_step = float(o.ada_target), float(o.ada_step)
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"--act-lambda must lie in [0, 1], got {self.lam}")
        if self.r1_every < 1 or self.r1_gamma < 0 or self.ada_step < 0:
            raise ConfigError("--r1-every must be >= 1, --r1-gamma and --ada-step >= 0")
        self.disc = Discriminator(model.in_channels, int(o.act_d_width))
        self.d_lr = float(o.act_d_lr)
        self.p, self.r1_ema = 0.0, 0.0

    def aux_modules(self):
        return {"disc": AuxModule(self.disc, lr=self.d_lr, betas=(0.0, 0.99))}

    @staticmethod
    def halves(batch: dict) -> tuple[dict, dict]:
        """The generator's and the discriminator's disjoint halves of the real batch."""
        b = batch["x"].shape[0]
        if b < 2 or b % 2:
            raise ConfigError(f"act splits each batch into a generator and a discriminator half: needs an even "
                              f"per-process batch >= 2, got {b}")
        h = b // 2
        first = {k: (v[:h] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v) for k, v in batch.items()}
        second = {k: (v[h:] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v) for k, v in batch.items()}
        return first, second

    def t_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w(t) = u(t) ** log2(lambda / mid), u the Karras-grid position of t in [0, 1] (float64);
        all ones for the constant schedule."""
        s = sigma.to(torch.float64)
        if self.schedule == "constant":
            return torch.ones_like(s)
        a, b = self.s_min ** (1 / self.rho), self.s_max ** (1 / self.rho)
        u = ((s ** (1 / self.rho) - a) / (b - a)).clamp(0.0, 1.0)
        return u ** self.lam_exp

    def lambda_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial weight per sample: lambda, or lambda * w(t)."""
        return self.lam * self.t_weight(sigma)

    def objective(self, model, batch, step, options):
        g_batch, _ = self.halves(batch)
        out = super().objective(model, g_batch, step, options)
        fake, sigma = out["pred"], out["sigma"]
        adv = F.softplus(-self.disc(self._aug(fake, batch), self.cond(sigma).float()))
        lam = self.lambda_t(sigma).to(adv.dtype)
        out["ct_distance"] = out["loss"].detach()
        out["g_adv"] = adv.mean().detach()
        out["act_lambda"] = lam.mean()
        out["loss"] = ((1 - lam) * out.pop("distance_per_sample") + lam * adv).mean()
        return out

    def _aug(self, x, batch):
        return augment(x, self.p, batch.get("generator"))

    def aux_loss(self, name, module, batch, step, out):
        _, d_batch = self.halves(batch)
        real = d_batch["x"]
        g = batch.get("generator")
        dev = g.device if g is not None else real.device
        grid = self.sigmas(self.num_scales(step), device=real.device)
        s_real = grid[torch.randint(0, grid.numel(), (real.shape[0],), generator=g, device=dev).to(real.device)]
        fake, s_fake = out["pred"].detach(), out["sigma"]
        real_aug = self._aug(real, batch)
        do_r1 = self.r1_gamma > 0 and step % self.r1_every == 0
        if do_r1:
            real_aug = real_aug.detach().requires_grad_(True)
        d_real = module(real_aug, self.cond(s_real).float())
        d_fake = module(self._aug(fake, batch), self.cond(s_fake).float())
        w_real, w_fake = self.t_weight(s_real).to(d_real.dtype), self.t_weight(s_fake).to(d_fake.dtype)
        loss = (F.softplus(-d_real) * w_real).mean() + (F.softplus(d_fake) * w_fake).mean()
        res = {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}
        if do_r1:
            (grad,) = torch.autograd.grad(d_real.sum(), real_aug, create_graph=True)
            r1 = (grad.pow(2).flatten(1).sum(1) * w_real).mean()
            loss = loss + 0.5 * self.r1_gamma * self.r1_scale * r1
            self.update_p(float(r1.detach()))
            res.update(r1=r1.detach(), ada_p=torch.tensor(self.p))
        res["loss"] = loss
        return res

    def update_p(self, r1: float) -> None:
        """R1 EMA (0.93) over processes against the threshold: p up a step above it, down below; in [0, 1]."""
        r1 = ddp.all_reduce_mean(r1)
        self.r1_ema = 0.93 * self.r1_ema + 0.07 * r1
        self.p += self.ada_step if self.r1_ema > self.ada_target else -self.ada_step
        self.p = min(1.0, max(0.0, self.p))

    def state_dict(self):
        return {**super().state_dict(), "ada_p": torch.tensor(self.p, dtype=torch.float64),
                "r1_ema": torch.tensor(self.r1_ema, dtype=torch.float64)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.p, self.r1_ema = float(state["ada_p"]), float(state["r1_ema"])
