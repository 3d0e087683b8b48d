"""DiT's objective and samplers: the DDPM of Ho et al. with IDDPM's learned-range variance.

Convention (as DiT's diffusion/ package, which follows ADM/IDDPM): integer steps t = 0..T-1, t = 0 the
least noisy, T = 1000, the linear beta schedule beta_t from 1e-4 to 2e-2 (scaled by 1000 / T),
    alpha_bar_t = prod_{s <= t} (1 - beta_s),   x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
The network sees t as the float step index (the original one, also when sampling on a respaced grid)
and predicts eps in its first C channels; with learn_sigma its other C channels v in [-1, 1] give
    log var = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta~_t        (IDDPM's "learned range")
between the posterior variance beta~_t and beta_t. Without them the variance is fixed ("fixed large":
beta_t, with beta~_1 at t = 0, as DiT's learn_sigma=False).

Loss ("hybrid", DiT's training loss): mean over C, H, W of (eps_hat - eps)^2, plus, with a learned
variance, the variational bound term L_vb (in bits per dimension) of the predicted Gaussian with the
mean stopped from gradient, so the bound trains only the variance:
    L_vb = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))  for t > 0,
           -log p(x_0 | x_1) under the discretised Gaussian (bins of 2/255 on [-1, 1])  at t = 0.

Sampling: `respace(steps)` keeps `steps` of the T steps (IDDPM's even spacing: DiT samples on 250)
and rebuilds the betas from alpha_bar at the kept steps, so the marginals stay those of the full
process; `ddpm` draws x_{t-1} ~ p(x_{t-1} | x_t) (DiT's p_sample_loop), `ddim` takes the DDIM update
with eta (0: deterministic).
"""
from __future__ import annotations

import math

import torch

from .flow import _expand, _gen_device

NUM_STEPS = 1000


# -----------------------------------------------------------------------------------------------
# Schedule
# -----------------------------------------------------------------------------------------------


def linear_betas(num_steps: int = NUM_STEPS, start: float = 1e-4, end: float = 2e-2) -> torch.Tensor:
    """DDPM's linear schedule (float64), scaled by 1000 / num_steps so other lengths keep its shape."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    scale = 1000 / num_steps
    return torch.linspace(scale * start, scale * end, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, count: int | str) -> list[int]:
    """The `count` steps of 0..num_steps-1 that a respaced sampler visits, ascending.

    An int (or "250"): IDDPM's spacing, round(k (num_steps - 1) / (count - 1)) for k = 0..count-1, so
    both ends are kept. "ddimN": the integer stride of the DDIM paper, range(0, num_steps, s) with
    exactly N elements (an error if no stride gives N).
    """
    if isinstance(count, str):
        if count.startswith("ddim"):
            n = int(count[4:])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == n:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"no integer stride gives exactly {n} of {num_steps} steps")
        count = int(count)
    if not isinstance(count, int) or not 1 <= count <= num_steps:
        raise ValueError(f"steps must be an int in [1, {num_steps}], got {count!r}")
    if count == 1:
        return [0]
    stride = (num_steps - 1) / (count - 1)
    return sorted({round(k * stride) for k in range(count)})


class GaussianDiffusion:
    """The schedule's arrays (float64, on the CPU) and the Gaussian arithmetic on them.

    `timestep_map[i]` is the original step that step i of this (possibly respaced) process is: what
    the network is conditioned on.
    """

    def __init__(self, betas: torch.Tensor | None = None, *, learn_sigma: bool = True,
                 timestep_map: list[int] | None = None):
        betas = linear_betas() if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.betas = betas
        self.num_steps = T = betas.shape[0]
        self.learn_sigma = learn_sigma
        self.timestep_map = list(range(T)) if timestep_map is None else list(timestep_map)
        alphas = 1.0 - betas
        self.alphas_cumprod = ac = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = acp = torch.cat([ac.new_ones(1), ac[:-1]])
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1).sqrt()
        self.posterior_variance = betas * (1 - acp) / (1 - ac)
        # beta~_0 = 0: its log is clipped to beta~_1's, as IDDPM does (the t = 0 term is a likelihood anyway)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if T > 1 else torch.log(betas)
        self.posterior_mean_coef1 = betas * acp.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - acp) * alphas.sqrt() / (1 - ac)

    def respace(self, steps: int | str) -> "GaussianDiffusion":
        """The process on `space_timesteps(T, steps)`: beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
        keep = space_timesteps(self.num_steps, steps)
        ac = self.alphas_cumprod[keep]
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return GaussianDiffusion(1 - ac / prev, learn_sigma=self.learn_sigma,
                                 timestep_map=[self.timestep_map[k] for k in keep])

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32 (DiT's _extract_into_tensor), broadcast over like's trailing dims."""
        return _expand(arr.to(t.device)[t].float(), like)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network is given at integer steps t (B,): timestep_map[t], float32."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t].float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.alphas_cumprod.sqrt(), t, x0) * x0 + self._at((1 - self.alphas_cumprod).sqrt(), t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def x0_from_eps(self, x_t, t, eps):
        return self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_x0(self, x_t, t, x0):
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def split_output(self, out: torch.Tensor, x_t: torch.Tensor):
        """(eps, variance values or None) from the network's output (B, C or 2C, ...)."""
        c = x_t.shape[1]
        if out.shape == x_t.shape:
            if self.learn_sigma:
                raise ValueError(f"a learned-variance process needs {2 * c} output channels, got {c}")
            return out, None
        if out.shape[0] == x_t.shape[0] and out.shape[1] == 2 * c and out.shape[2:] == x_t.shape[2:]:
            if not self.learn_sigma:
                return out[:, :c], None  # a sigma half the process does not use
            return out[:, :c], out[:, c:]
        raise ValueError(f"the model's output {tuple(out.shape)} matches neither x_t {tuple(x_t.shape)} nor (B, 2C, ...)")

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False):
        """dict(mean, log_variance, pred_x0, eps) of p(x_{t-1} | x_t) from the network's output."""
        eps, var_values = self.split_output(out, x_t)
        if var_values is not None:
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(torch.log(self.betas), t, x_t)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            # fixed large: beta_t, with beta~_1 at t = 0 (a log of 0 otherwise)
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            log_var = self._at(torch.log(large), t, x_t).expand_as(x_t)
        pred_x0 = self.x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}


# -----------------------------------------------------------------------------------------------
# Likelihood terms
# -----------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi that ADM/IDDPM/DiT use (kept, so the losses are theirs)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log P(x) elementwise for data in [-1, 1] quantised to 256 levels, under N(means, e^(2 log_scales)):
    the mass of the bin x +- 1/255, the edge bins open to -inf / +inf."""
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise ValueError(f"x, means and log_scales must share one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


# -----------------------------------------------------------------------------------------------
# The objective
# -----------------------------------------------------------------------------------------------


class DDPMObjective:
    """DiT's training loss: eps MSE, plus L_vb on the learned variance (mean stop-gradient)."""

    def __init__(self, diffusion: GaussianDiffusion | None = None):
        self.diffusion = diffusion or GaussianDiffusion()

    def sample_t(self, batch: int, device, generator=None) -> torch.Tensor:
        """t ~ U{0, ..., T-1}, int64 (B,)."""
        return torch.randint(0, self.diffusion.num_steps, (batch,), generator=generator,
                             device=_gen_device(generator, device)).to(device)

    def vb_terms(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B,) bits per dimension: the KL of the posterior and the prediction for t > 0, the decoder's
        negative log-likelihood of x0 at t = 0."""
        d = self.diffusion
        true_mean, true_log_var = d.q_posterior(x0, x_t, t)
        p = d.p_mean_variance(out, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss(self, model, x: torch.Tensor, y=None, generator=None, *, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, **model_kwargs) -> dict:
        """dict(loss, loss_per_sample, mse, vb, t, noise, x_t, pred, target, diffusion[, hidden]); the
        network is called as model(x_t, diffusion.model_time(t), y, **model_kwargs). t (B,) int and
        noise may be given. "diffusion" is the process that noised x (x_t = diffusion.q_sample(x, t,
        noise)), for a method that noises x again (SRA's teacher)."""
        if not torch.is_tensor(x) or x.dim() < 2:
            raise ValueError(f"DDPMObjective.loss: x must be a tensor (B, ...), got {type(x).__name__}")
        b = x.shape[0]
        if t is None:
            t = self.sample_t(b, x.device, generator)
        else:
            t = torch.as_tensor(t, device=x.device)
            if t.shape != (b,) or t.is_floating_point():
                raise ValueError(f"DDPMObjective.loss: t must be integer steps of shape ({b},), got "
                                 f"{t.dtype} {tuple(t.shape)}")
            if bool(((t < 0) | (t >= self.diffusion.num_steps)).any()):
                raise ValueError(f"DDPMObjective.loss: t must lie in [0, {self.diffusion.num_steps})")
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device),
                                dtype=torch.float32).to(device=x.device, dtype=x.dtype)
        elif noise.shape != x.shape:
            raise ValueError(f"DDPMObjective.loss: noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        x_t = self.diffusion.q_sample(x, t, noise)
        out = model(x_t, self.diffusion.model_time(t), y, **model_kwargs)
        hidden = None
        if isinstance(out, tuple):
            out, hidden = out
        eps, var_values = self.diffusion.split_output(out, x_t)
        # fp32 terms whatever the autocast dtype (as the flow loss)
        eps, x0, xt32 = eps.float(), x.float(), x_t.float()
        mse = (eps - noise.float()).pow(2).flatten(1).mean(1)
        res = {"t": t, "noise": noise, "x_t": x_t, "pred": eps, "target": noise, "diffusion": self.diffusion}
        if var_values is not None:
            # the bound trains only the variance: the mean (through eps) is held fixed in it
            frozen = torch.cat([eps.detach(), var_values.float()], dim=1)
            vb = self.vb_terms(frozen, x0, xt32, t)
            per_sample = mse + vb
            res["vb"] = vb.mean()
        else:
            per_sample = mse
        res.update(loss=per_sample.mean(), loss_per_sample=per_sample.detach(), mse=mse.mean())
        if hidden is not None:
            res["hidden"] = hidden
        return res


# -----------------------------------------------------------------------------------------------
# Samplers
# -----------------------------------------------------------------------------------------------


