"""DDPM and DDIM sampling of DiT's noise-predicting models (IDDPM's respaced steps, classifier-free guidance)."""
from __future__ import annotations

import torch

from ..backbone.guidance import cfg_forward
from ..objectives.ddpm import GaussianDiffusion
from ..objectives.flow import _gen_device
from ..objectives.prediction import model_output

DIFFUSION_SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def diffusion_sample(model, y, noise: torch.Tensor, *, sampler: str = "ddpm", steps: int | str = 250,
                     cfg_scale: float = 1.0, guided_channels: int | None = None, null_class: int | None = None,
                     eta: float = 0.0, clip_denoised: bool = False, generator: torch.Generator | None = None,
                     diffusion: GaussianDiffusion | None = None, **model_kwargs) -> torch.Tensor:
    """x_0 from x_{T-1} = noise by DDPM ancestral sampling or DDIM on `steps` respaced steps.

    The network (eps in its first C channels, an optional learned-range variance after them) is
    called with the original step index. cfg_scale != 1 guides the first `guided_channels` output
    channels (None: all C of eps; DiT's own sampler guides 3, the rest, variance included, from the
    conditional branch). `generator` draws the per-step noise. clip_denoised clamps the predicted x_0
    to [-1, 1] (DiT samples latents with it off).
    """
    if sampler not in DIFFUSION_SAMPLERS:
        raise ValueError(f"sampler must be one of {DIFFUSION_SAMPLERS}, got {sampler!r}")
    if not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if diffusion is None:
        diffusion = GaussianDiffusion(learn_sigma=bool(getattr(model, "learn_sigma", True)))
    d = diffusion.respace(steps)
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
    x = noise.clone()
    b = x.shape[0]
    tmap = torch.as_tensor(d.timestep_map, device=x.device)
    for i in reversed(range(d.num_steps)):
        t = torch.full((b,), i, dtype=torch.long, device=x.device)
        tm = tmap[t].float()
        if cfg_scale != 1.0 and y is not None:
            out = cfg_forward(model, x, tm, y, cfg_scale, null_class=null_class,
                              guided_channels=guided_channels or x.shape[1], **model_kwargs)
        else:
            out = model_output(model(x, tm, y, **model_kwargs))
        p = d.p_mean_variance(out.float(), x.float(), t, clip_denoised=clip_denoised)
        nonzero = float(i != 0)
        if sampler == "ddpm":
            z = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device)).to(x.device)
            x = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * z
        else:
            ab = d._at(d.alphas_cumprod, t, x)
            ab_prev = d._at(d.alphas_cumprod_prev, t, x)
            eps = d.eps_from_x0(x.float(), t, p["pred_x0"])
            sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
            x = p["pred_x0"] * ab_prev.sqrt() + (1 - ab_prev - sigma**2).sqrt() * eps
            if eta > 0:
                z = torch.randn(x.shape, generator=generator, device=_gen_device(generator, x.device)).to(x.device)
                x = x + nonzero * sigma * z
        x = x.to(noise.dtype)
    return x
