"""Classifier-free guidance and what a network's output means, shared by the samplers and the backbone.

cfg_scale s mixes v_u + s (v_c - v_u). `guided_channels` limits it to the first k channels (the others
from the conditional branch), as DiT's and SiT's forward_with_cfg do with k = 3 (their published FIDs
were sampled so; REPA guides all): "auto" (the default) takes the paper's k from a checkpoint loaded by
load_official (`model.interop`), else all.
"""
from __future__ import annotations

import torch

from ..objectives.prediction import mean_prediction, model_output


def cfg_forward(model, x, t, y, cfg_scale: float, *, null_class: int | None = None, guided_channels: int | None = None,
                **model_kwargs) -> torch.Tensor:
    """Classifier-free guidance in one forward on the doubled batch, as DiT does (a block then sees
    the same batch either way): out_u + s (out_c - out_u) on the first `guided_channels` channels
    (default: all), the rest (a learned-sigma half) from the conditional branch. t: (B,) or scalar."""
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
    if null_class is None:
        raise ValueError("cfg_scale != 1 needs null_class (or a model with .num_classes)")
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    out = model_output(model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]),
                        **model_kwargs))
    cond, uncond = out.chunk(2)
    c = cond.shape[1] if guided_channels is None else guided_channels
    guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
    return guided if c == cond.shape[1] else torch.cat([guided, cond[:, c:]], dim=1)


def paper_guided_channels(model, guided_channels="auto") -> int | None:
    """The channels CFG guides: "auto" -> the loaded paper checkpoint's (model.interop; DiT/SiT: 3,
    REPA: all) or all; None -> all; an int k -> the first k."""
    if guided_channels == "auto":
        interop = getattr(model, "interop", None)
        return getattr(interop, "guided_channels", None)
    if guided_channels is not None and (not isinstance(guided_channels, int) or isinstance(guided_channels, bool)
                                        or guided_channels < 1):
        raise ValueError(f"guided_channels must be 'auto', None or a positive int, got {guided_channels!r}")
    return guided_channels


def guided_velocity(model, x, t: float, y, *, cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
                    null_class: int | None = None, guided_channels: int | None = None, guide: bool | None = None,
                    **model_kwargs) -> torch.Tensor:
    """The velocity, guided (cfg_forward) when t lies in [low, high] and s != 1, else the conditional
    one; a learned-sigma half of the output is dropped (the samplers need only the mean).
    guided_channels: the first k channels are guided (None: all). guide: force the decision (Heun's
    corrector takes the one made at its step's t_cur)."""
    low, high = guidance_interval
    if guide is None:
        guide = low <= t <= high
    if cfg_scale == 1.0 or y is None or not guide:
        tv = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        out = model_output(model(x, tv, y, **model_kwargs))
    else:
        c = x.shape[1] if guided_channels is None else min(guided_channels, x.shape[1])
        out = cfg_forward(model, x, float(t), y, cfg_scale, null_class=null_class, guided_channels=c,
                          **model_kwargs)
    return mean_prediction(out, x)


