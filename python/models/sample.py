"""Samplers for the flow-matching models: ODE (Euler, Heun) and SDE (Euler-Maruyama), classifier-free
guidance on an interval of t, and the `effkernels-sample` CLI (PNG grid + .npz from a checkpoint's EMA).

Time runs from t = 1 (noise) to t = 0 (data) on a uniform grid of `steps` intervals.

SDE. The forward-in-t SDE  dx = [v + (w/2) s] dt + sqrt(w) dW  has the same marginals as the ODE
dx = v dt (its Fokker-Planck terms -(w/2) div(p s) + (w/2) lap p cancel, since p s = grad p). Its
reverse-time SDE (t decreasing) is  dx = [v - (w/2) s] dt + sqrt(w) dW_bar, with w(t) = 2t (SiT's
default "sigma" diffusion, where their noise term is sqrt(2 sigma_t) dW). With the score from
`objectives.score_from_velocity`, s = -(x + (1 - t) v) / t, the drift becomes v - t s = (2 - t) v + x,
free of the 1/t. The last step (to t = 0, where the score is undefined) is a plain Euler ODE step.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .objectives import mean_prediction

SAMPLERS = ("euler", "heun", "euler-maruyama")


# -----------------------------------------------------------------------------------------------
# Guidance
# -----------------------------------------------------------------------------------------------


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


def guided_velocity(model, x, t: float, y, *, cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
                    null_class: int | None = None, **model_kwargs) -> torch.Tensor:
    """The velocity, guided (cfg_forward) when t lies in [low, high] and s != 1, else the conditional
    one; a learned-sigma half of the output is dropped (the samplers need only the mean)."""
    low, high = guidance_interval
    if cfg_scale == 1.0 or y is None or not (low <= t <= high):
        tv = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        out = model_output(model(x, tv, y, **model_kwargs))
    else:
        out = cfg_forward(model, x, float(t), y, cfg_scale, null_class=null_class, guided_channels=x.shape[1],
                          **model_kwargs)
    return mean_prediction(out, x)


def model_output(out):
    return out[0] if isinstance(out, tuple) else out


# -----------------------------------------------------------------------------------------------
# Samplers
# -----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model, y=None, shape=None, *, noise: torch.Tensor | None = None, sampler: str = "heun", steps: int = 50,
           cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0), null_class: int | None = None,
           generator: torch.Generator | None = None, clamp=(-1.0, 1.0), device=None, **model_kwargs) -> torch.Tensor:
    """Draw samples x_0 from `model(x, t, y) -> v` starting at x_1 = noise ~ N(0, I).

    `shape` is the full (B, C, H, W) (or (B, D)) when `noise` is not given. `clamp` is the data's value
    range (None for unbounded data such as latents). `generator` drives the initial and SDE noise.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sample: sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample: steps must be a positive int, got {steps!r}")
    low, high = guidance_interval
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"sample: guidance_interval must satisfy 0 <= low <= high <= 1, got {guidance_interval}")
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

    def vel(x_, t_):
        return guided_velocity(model, x_, t_, y, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                               null_class=null_class, **model_kwargs).to(x_.dtype)

    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        h = t - t_next
        v = vel(x, t)
        if sampler == "euler" or (sampler == "euler-maruyama" and i == steps - 1):
            x = x - h * v
        elif sampler == "heun":
            x_pred = x - h * v
            x = x - 0.5 * h * (v + vel(x_pred, t_next))
        else:
            drift = (2.0 - t) * v + x  # v - (w/2) s with w = 2t
            gen_dev = generator.device if generator is not None else x.device
            z = torch.randn(x.shape, generator=generator, device=gen_dev)
            x = x - h * drift + math.sqrt(2.0 * t * h) * z.to(device=x.device, dtype=x.dtype)
    if clamp is not None:
        x = x.clamp(clamp[0], clamp[1])
    return x


# -----------------------------------------------------------------------------------------------
# Images
# -----------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor, value_range=(-1.0, 1.0)) -> torch.Tensor:
    """(B, C, H, W) in value_range -> uint8 (B, H, W, C)."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, value_range=(-1.0, 1.0),
              min_cell: int = 32) -> str:
    """Write a PNG grid of (B, C, H, W) images; small images are enlarged (nearest) to >= min_cell px."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the train extra
        raise RuntimeError("save_grid needs pillow (pip install pillow)") from e
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid: images must be (B, 1|3, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    pad = 1
    u8 = to_uint8(images, value_range)
    grid = torch.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = u8[i]
    arr = grid.numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


# -----------------------------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effkernels-sample",
        description="Sample a PNG grid and an .npz (images, labels) from a checkpoint's EMA weights.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by effkernels-train")
    p.add_argument("--out", required=True, help="output prefix: writes <out>.png and <out>.npz")
    p.add_argument("--num", type=int, default=100, help="number of samples (labels cycle 0..num_classes-1)")
    p.add_argument("--sampler", choices=SAMPLERS, default="heun")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--sparse-guidance", type=float, default=None, metavar="S",
                   help="TREAD checkpoints: sparse guidance v_weak + S (v_strong - v_weak) (the paper: 1.5)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda", "cpp"))
    return p


def _positive(p, name, value):
    if value < 1:
        p.error(f"{name} must be >= 1, got {value}")


def main(argv=None) -> int:
    import numpy as np

    import effkernels

    from .checkpoint import CheckpointError, generator_from_checkpoint, load_checkpoint
    from .cli import check_backend_arg
    from .methods import ConfigError

    p = build_parser()
    args = p.parse_args(argv)
    _positive(p, "--num", args.num)
    _positive(p, "--steps", args.steps)
    _positive(p, "--batch-size", args.batch_size)
    if not (0.0 <= args.guidance_low <= args.guidance_high <= 1.0):
        p.error("--guidance-low/--guidance-high must satisfy 0 <= low <= high <= 1")
    check_backend_arg(p, args.backend, args.device)
    try:
        ckpt = load_checkpoint(args.ckpt)
        method, models, meta = generator_from_checkpoint(ckpt, ema=not args.no_ema)
    except (CheckpointError, ValueError) as e:
        print(f"effkernels-sample: error: {e}", file=sys.stderr)
        return 2
    extra = {}
    if args.sparse_guidance is not None:
        if "tread" not in meta.get("method", "").split("+"):
            p.error(f"--sparse-guidance needs a TREAD checkpoint; {args.ckpt!r} was trained with {meta.get('method')!r}")
        extra["sparse_guidance"] = args.sparse_guidance
    models = {k: m.to(args.device).eval() for k, m in models.items()}
    model = models["backbone"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ncls = int(getattr(model, "num_classes", 1) or 1)
    labels = torch.arange(args.num) % ncls
    value_range = tuple(meta["value_range"]) if meta.get("value_range") is not None else None
    shape = tuple(meta.get("shape") or (model.in_channels, model.input_size, model.input_size))
    outs = []
    try:
        with effkernels.use_backend(args.backend):
            for s in range(0, args.num, args.batch_size):
                y = labels[s:s + args.batch_size].to(args.device)
                noise = torch.randn((y.shape[0], *shape), generator=gen).to(args.device)
                # the method samples: a consistency model in one or two steps, MaskDiT through its decoder
                outs.append(method.sample(models, y, noise, sampler=args.sampler, steps=args.steps,
                                          cfg_scale=args.cfg_scale,
                                          guidance_interval=(args.guidance_low, args.guidance_high),
                                          generator=gen, clamp=value_range, **extra).cpu())
    except ConfigError as e:  # the method cannot sample this way (e.g. sparse guidance without routes)
        print(f"effkernels-sample: error: {e}", file=sys.stderr)
        return 2
    images = torch.cat(outs)
    npz = args.out + ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
    np.savez(npz, images=images.float().numpy(), labels=labels.numpy())
    print(f"wrote {npz} ({args.num} samples)")
    if images.shape[1] in (1, 3) and value_range is not None:
        print(f"wrote {save_grid(images[:256], args.out + '.png', value_range=value_range)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
