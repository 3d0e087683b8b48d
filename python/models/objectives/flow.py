"""Training objectives. SiT's linear-interpolant flow matching is the ground every method stands on.

Convention (SiT's): t = 0 is data, t = 1 is noise,
    x_t = (1 - t) x + t eps,    target velocity v = d x_t / d t = eps - x,
loss = mean over C, H, W of (v_hat - v)^2, then mean over the batch, t ~ U(0, 1).

For this path the score of x_t follows from the velocity (derivation in `score_from_velocity`),
which is what the SDE sampler needs; it lives here so that the sampler and its tests share it.
"""
from __future__ import annotations

import torch

from .prediction import mean_prediction

# -----------------------------------------------------------------------------------------------
# The interpolant
# -----------------------------------------------------------------------------------------------


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so that it broadcasts against `like` (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t noise, t of shape (B,) broadcast over the rest."""
    tt = _expand(t, x)
    return (1 - tt) * x + tt * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = noise - x (independent of t for the linear path)."""
    return noise - x


def score_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """grad log p_t(x_t) from the velocity v(x_t, t) = E[eps - x | x_t].

    With x = (x_t - t eps) / (1 - t), v = E[eps | x_t] - E[x | x_t] = (E[eps | x_t] - x_t) / (1 - t),
    so E[eps | x_t] = x_t + (1 - t) v. Since x_t = (1 - t) x + t eps with eps ~ N(0, I), Tweedie gives
    score = -E[eps | x_t] / t = -(x_t + (1 - t) v) / t. Undefined at t = 0 (no noise left), which is
    why the SDE sampler's last step is deterministic.
    """
    if not torch.is_tensor(t):
        t = torch.full((x_t.shape[0],), float(t), dtype=x_t.dtype, device=x_t.device)
    if bool((t <= 0).any()):
        raise ValueError("score_from_velocity: t must be > 0 (the score of the data itself is not defined here)")
    tt = _expand(t, x_t)
    return -(x_t + (1 - tt) * v) / tt


# -----------------------------------------------------------------------------------------------
# The objective
# -----------------------------------------------------------------------------------------------


class FlowMatching:
    """SiT's flow-matching loss with velocity prediction, reusable by methods that add terms to it.

    `t_min`/`t_max` bound the sampled times (defaults 0 and 1, as SiT trains).
    """

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        if not (0.0 <= t_min < t_max <= 1.0):
            raise ValueError(f"FlowMatching: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    interpolate = staticmethod(interpolate)
    velocity_target = staticmethod(velocity_target)

    def sample_t(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U(t_min, t_max), shape (B,), float32."""
        u = torch.rand(batch, generator=generator, device=_gen_device(generator, device))
        return (self.t_min + (self.t_max - self.t_min) * u).to(device)

    def sample_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device), dtype=torch.float32)
        return noise.to(device=x.device, dtype=x.dtype)

    def loss(self, model, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
             *, t: torch.Tensor | None = None, noise: torch.Tensor | None = None, **model_kwargs) -> dict:
        """Flow-matching loss of `model(x_t, t, y, **model_kwargs)`.

        `t` (B,) and `noise` (like x) may be given (tests, data-parallel checks); otherwise they are drawn
        from `generator`. Returns dict(loss=scalar, loss_per_sample=(B,), t, noise, x_t, pred, target);
        if the model returns (out, hidden) the hidden states are passed on under "hidden".
        """
        if not torch.is_tensor(x) or x.dim() < 2:
            raise ValueError(f"FlowMatching.loss: x must be a tensor (B, ...), got {type(x).__name__}"
                             f"{'' if not torch.is_tensor(x) else tuple(x.shape)}")
        b = x.shape[0]
        if t is None:
            t = self.sample_t(b, x.device, generator)
        elif t.shape != (b,):
            raise ValueError(f"FlowMatching.loss: t must have shape ({b},), got {tuple(t.shape)}")
        if noise is None:
            noise = self.sample_noise(x, generator)
        elif noise.shape != x.shape:
            raise ValueError(f"FlowMatching.loss: noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        x_t = interpolate(x, noise, t)
        target = velocity_target(x, noise)
        out = model(x_t, t, y, **model_kwargs)
        hidden = None
        if isinstance(out, tuple):
            out, hidden = out
        out = mean_prediction(out, target)  # the flow loss has no variance term: a sigma half is unused
        # fp32 loss whatever the autocast dtype: the per-sample mean of small squared errors is where bf16 hurts.
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        res = {"loss": per_sample.mean(), "loss_per_sample": per_sample.detach(), "t": t, "noise": noise, "x_t": x_t,
                   "pred": out, "target": target}
        if hidden is not None:
            res["hidden"] = hidden
        return res


def _gen_device(generator, fallback):
    """A torch.Generator draws on its own device; draw there and move, so CPU generators work for CUDA data."""
    return generator.device if generator is not None else fallback
