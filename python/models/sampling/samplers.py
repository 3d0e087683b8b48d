"""Samplers: ODE (Euler, Heun) and SDE (Euler-Maruyama) for the flow-matching models, DDPM and DDIM for
DiT's noise-predicting ones (effkernels.models.objectives.ddpm), classifier-free guidance (guidance.py) on an
interval of t.

Time runs from t = 1 (noise) to t = 0 (data), REPA's convention; an official SiT checkpoint (t = 0 noise)
is turned into it when loaded (convert.load_official). The state is integrated in float64 and the
network called in the noise's dtype, as REPA's samplers do.

Grids, as REPA's samplers (the published FIDs' ones) by default:
  euler  `steps` uniform steps from 1 to 0.
  heun   the same grid, Heun's corrector on every step but the last (a plain Euler step into t = 0,
         where REPA skips it), guidance decided at the step's t_cur for both evaluations.
         `heun_last_corrector=True` applies the corrector on the last step too; `guidance_at="t_next"`
         lets the corrector decide guidance at its own t (t_next).
  euler-maruyama  steps - 1 Euler-Maruyama steps on a uniform grid from 1 to `sde_last_step` (0.04),
         then one noise-free step of that length whose drift includes the score term (SiT's "Mean"
         last step, REPA's `mean_x`). `sde_last_step=None`: `steps` uniform steps to 0, the last a plain
         Euler ODE step.

SDE. The forward-in-t SDE  dx = [v + (w/2) s] dt + sqrt(w) dW  has the same marginals as the ODE
dx = v dt (its Fokker-Planck terms -(w/2) div(p s) + (w/2) lap p cancel, since p s = grad p). Its
reverse-time SDE (t decreasing) is  dx = [v - (w/2) s] dt + sqrt(w) dW_bar, with w(t) = 2t (SiT's
default "sigma" diffusion, where their noise term is sqrt(2 sigma_t) dW). With the score from
`objectives.score_from_velocity`, s = -(x + (1 - t) v) / t, the drift becomes v - t s = (2 - t) v + x,
free of the 1/t.

Guidance: cfg_scale on t in guidance_interval; guided_channels as guidance.py says.

Clamping. `clamp=None` by default: latents are unbounded. Pass the data's value range where the data
are known to be images in it (the trainer's digits evaluation passes (-1, 1)).
"""
from __future__ import annotations

import math

import torch

from ..backbone.guidance import guided_velocity, paper_guided_channels
from ..objectives.prediction import predicts_noise
from .ddpm import diffusion_sample

FLOW_SAMPLERS = ("euler", "heun", "euler-maruyama")
SAMPLERS = FLOW_SAMPLERS + ("ddpm", "ddim")
SDE_LAST_STEP = 0.04  # SiT's and REPA's last_step_size


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    # REPA integrates in float64; MPS has none
    return torch.float32 if x.device.type == "mps" else torch.float64


@torch.no_grad()
def sample(model, y=None, shape=None, *, noise: torch.Tensor | None = None, sampler: str | None = None,
           steps: int | None = None, cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0), guided_channels="auto",
           null_class: int | None = None, generator: torch.Generator | None = None, clamp=None, device=None,
           sde_last_step: float | None = SDE_LAST_STEP, heun_last_corrector: bool = False, guidance_at: str = "t_cur",
           **model_kwargs) -> torch.Tensor:
    """Draw samples x_0 from `model(x, t, y) -> v` starting at x_1 = noise ~ N(0, I).

    `shape` is the full (B, C, H, W) (or (B, D)) when `noise` is not given. sampler: one of SAMPLERS;
    default "heun", or "ddpm" for a noise-predicting model (an official DiT checkpoint: then "ddpm" and
    "ddim" only, on `steps` respaced steps, default 250). steps: default 50 for the flow samplers.
    `clamp` is a value range to clamp the result to (None, the default: no clamping, as for latents).
    `generator` drives the initial and the SDE / DDPM noise. The grid and guidance options are those
    of the module docstring.
    """
    eps_model = predicts_noise(model)
    if sampler is None:
        sampler = "ddpm" if eps_model else "heun"
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if eps_model != (sampler not in FLOW_SAMPLERS):
        what = "predicts DDPM noise (DiT)" if eps_model else "predicts a velocity"
        ok = "ddpm, ddim" if eps_model else ", ".join(FLOW_SAMPLERS)
        raise ValueError(f"sample: sampler {sampler!r} does not fit this model, which {what}; use one of {ok}")
    if steps is None:
        steps = 250 if eps_model else 50
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sample: steps must be a positive int, got {steps!r}")
    low, high = guidance_interval
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"sample: guidance_interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")
    if guidance_at not in ("t_cur", "t_next"):
        raise ValueError(f"sample: guidance_at must be 't_cur' or 't_next', got {guidance_at!r}")
    if sde_last_step is not None and not (0.0 < sde_last_step < 1.0):
        raise ValueError(f"sample: sde_last_step must lie in (0, 1) or be None, got {sde_last_step!r}")
    gc = paper_guided_channels(model, guided_channels)
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
    if noise is None:
        if shape is None:
            raise ValueError("sample: give either noise or shape")
        noise = torch.randn(tuple(shape), generator=generator,
                            device=generator.device if generator is not None else (device or "cpu"))
    x = noise.to(device) if device is not None else noise.clone()
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"sample: y has {y.shape[0]} labels for {x.shape[0]} samples")

    if eps_model:
        if tuple(guidance_interval) != (0.0, 1.0):
            raise ValueError("sample: guidance_interval applies to the flow samplers; DDPM/DDIM guide every step")
        x = diffusion_sample(model, y, x, sampler=sampler, steps=steps, cfg_scale=cfg_scale, guided_channels=gc,
                             null_class=null_class, generator=generator, **model_kwargs)
        return x.clamp(clamp[0], clamp[1]) if clamp is not None else x

    in_dtype = x.dtype

    def vel(x_, t_, guide=None):
        return guided_velocity(model, x_.to(in_dtype), t_, y, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                               null_class=null_class, guided_channels=gc, guide=guide,
                               **model_kwargs).to(x_.dtype)

    def in_interval(t_):
        return low <= t_ <= high

    def noise_like(x_):
        gen_dev = generator.device if generator is not None else x_.device
        z = torch.randn(x_.shape, generator=generator, device=gen_dev)  # float32 draws, as before
        return z.to(device=x_.device, dtype=x_.dtype)

    x = x.to(_state_dtype(x))
    if sampler == "euler-maruyama" and sde_last_step is not None:
        # REPA's grid: linspace(1, last, steps) then 0; the last step is the drift's mean, no noise
        ts = torch.linspace(1.0, sde_last_step, steps, dtype=torch.float64).tolist() + [0.0]
    else:
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        h = t - t_next
        last = i == steps - 1
        v = vel(x, t)
        if sampler == "euler":
            x = x - h * v
        elif sampler == "heun":
            x_pred = x - h * v
            if last and not heun_last_corrector:
                x = x_pred
            else:
                guide = in_interval(t) if guidance_at == "t_cur" else None
                x = x - 0.5 * h * (v + vel(x_pred, t_next, guide))
        elif last and sde_last_step is None:
            x = x - h * v  # sde_last_step=None: a plain Euler step into t = 0
        else:
            x = x - h * ((2.0 - t) * v + x)  # drift v - (w/2) s with w = 2t
            if not last:
                x = x + math.sqrt(2.0 * t * h) * noise_like(x)
    x = x.to(in_dtype)
    if clamp is not None:
        x = x.clamp(clamp[0], clamp[1])
    return x
