"""Samplers: ODE (Euler, Heun) and SDE (Euler-Maruyama) for the flow-matching models, DDPM and DDIM for
DiT's noise-predicting ones (effkernels.models.diffusion), classifier-free guidance on an interval of t,
and the `effkernels-sample` CLI (PNG grid + .npz from a checkpoint's EMA, or from an official checkpoint).

Time runs from t = 1 (noise) to t = 0 (data), REPA's convention; an official SiT checkpoint (t = 0 noise)
is turned into it when loaded (convert.load_official). The state is integrated in float64 and the
network called in the noise's dtype, as REPA's samplers do.

Grids, as REPA's samplers (the published FIDs' ones) by default:
  euler  `steps` uniform steps from 1 to 0.
  heun   the same grid, Heun's corrector on every step but the last (a plain Euler step into t = 0,
         where REPA skips it), guidance decided at the step's t_cur for both evaluations
         (`heun_last_corrector=True`, `guidance_at="t_next"`: the earlier behaviour of this library).
  euler-maruyama  steps - 1 Euler-Maruyama steps on a uniform grid from 1 to `sde_last_step` (0.04),
         then one noise-free step of that length whose drift includes the score term (SiT's "Mean"
         last step, REPA's `mean_x`). `sde_last_step=None`: `steps` uniform steps to 0, the last a plain
         Euler ODE step (the earlier behaviour).

SDE. The forward-in-t SDE  dx = [v + (w/2) s] dt + sqrt(w) dW  has the same marginals as the ODE
dx = v dt (its Fokker-Planck terms -(w/2) div(p s) + (w/2) lap p cancel, since p s = grad p). Its
reverse-time SDE (t decreasing) is  dx = [v - (w/2) s] dt + sqrt(w) dW_bar, with w(t) = 2t (SiT's
default "sigma" diffusion, where their noise term is sqrt(2 sigma_t) dW). With the score from
`objectives.score_from_velocity`, s = -(x + (1 - t) v) / t, the drift becomes v - t s = (2 - t) v + x,
free of the 1/t.

Guidance. cfg_scale s mixes v_u + s (v_c - v_u) for t in guidance_interval. `guided_channels` limits
it to the first k channels (the others from the conditional branch), as DiT's and SiT's
forward_with_cfg do with k = 3 (their published FIDs were sampled so; REPA guides all): "auto" (the
default) takes the paper's k from a checkpoint loaded by load_official (`model.interop`), else all.

Clamping. `clamp=None` by default: latents are unbounded. Pass the data's value range where the data
are known to be images in it (the trainer's digits evaluation passes (-1, 1)).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .objectives import mean_prediction

FLOW_SAMPLERS = ("euler", "heun", "euler-maruyama")
SAMPLERS = FLOW_SAMPLERS + ("ddpm", "ddim")
SDE_LAST_STEP = 0.04  # SiT's and REPA's last_step_size


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


def model_output(out):
    return out[0] if isinstance(out, tuple) else out


def predicts_noise(model) -> bool:
    """Whether the network predicts DDPM noise (an official DiT checkpoint), not a velocity."""
    return getattr(getattr(model, "interop", None), "prediction", "velocity") == "eps"


# -----------------------------------------------------------------------------------------------
# Samplers
# -----------------------------------------------------------------------------------------------


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
        from .diffusion import diffusion_sample

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
            x = x - h * v  # the earlier grid: a plain Euler step into t = 0
        else:
            x = x - h * ((2.0 - t) * v + x)  # drift v - (w/2) s with w = 2t
            if not last:
                x = x + math.sqrt(2.0 * t * h) * noise_like(x)
    x = x.to(in_dtype)
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
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by effkernels-train, or an official DiT/SiT/REPA one with --official")
    p.add_argument("--official", default=None, metavar="CONFIG",
                   help="--ckpt is an official checkpoint of this config (DiT-XL/2, SiT-XL/2: SiT's time and "
                        "learned sigma adapted; REPA recognised by its keys), loaded with load_official")
    p.add_argument("--flavor", default=None, choices=("dit", "sit", "repa"),
                   help="with --official: what the checkpoint is, when its name and keys do not say")
    p.add_argument("--num-classes", type=int, default=None,
                   help="with --official: labels cycle over this many classes (default: the checkpoint's)")
    p.add_argument("--out", required=True, help="output prefix: writes <out>.png and <out>.npz")
    p.add_argument("--num", type=int, default=100, help="number of samples (labels cycle 0..num_classes-1)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default heun for flow models, ddpm for DiT (noise-predicting) ones")
    p.add_argument("--steps", type=int, default=None, help="default 50 (flow samplers) or 250 (ddpm, ddim)")
    p.add_argument("--guided-channels", default="auto",
                   help="CFG guides the first K channels: 'auto' (the paper's for an --official DiT/SiT "
                        "checkpoint: 3; else all), 'all', or K")
    p.add_argument("--sde-last-step", type=float, default=SDE_LAST_STEP,
                   help="euler-maruyama: the final noise-free step's length (SiT/REPA: 0.04); 0: the uniform "
                        "grid to t = 0 with a plain Euler last step")
    p.add_argument("--heun-last-corrector", action="store_true",
                   help="heun: apply the corrector on the last step too (REPA skips it)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--sparse-guidance", type=float, default=None, metavar="S",
                   help="TREAD checkpoints: sparse guidance v_weak + S (v_strong - v_weak) (the paper: 1.5)")
    p.add_argument("--sparse-guidance-strong", type=float, default=None, metavar="RATE",
                   help="with --sparse-guidance: the strong branch's forced routing rate in [0, 1) (default: the "
                        "checkpoint's --sparse-guidance-strong, 0.3)")
    p.add_argument("--sparse-guidance-weak", type=float, default=None, metavar="RATE",
                   help="with --sparse-guidance: the weak branch's forced routing rate in [0, 1) (default: the "
                        "checkpoint's --sparse-guidance-weak, 0.7)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda", "cpp"))
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="a local diffusers AutoencoderKL folder: decode the latents (/ 0.18215) and write "
                        "<out>_png/*.png, the grid <out>_decoded.png and <out>_images.npz (uint8 arr_0, ADM's layout)")
    from .presets import add_preset_arg

    add_preset_arg(p)
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
    from .presets import announce, apply_preset

    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    preset, installed = apply_preset(p, argv, kind="sample")  # a paper's sampler settings as defaults
    args = p.parse_args(argv)
    announce(preset, args, installed, "effkernels-sample")
    _positive(p, "--num", args.num)
    if args.steps is not None:
        _positive(p, "--steps", args.steps)
    _positive(p, "--batch-size", args.batch_size)
    if (args.flavor or args.num_classes) and not args.official:
        p.error("--flavor and --num-classes go with --official")
    gc = args.guided_channels
    if gc not in ("auto", "all"):
        try:
            gc = int(gc)
            assert gc >= 1
        except (ValueError, AssertionError):
            p.error(f"--guided-channels must be 'auto', 'all' or a positive int, got {args.guided_channels!r}")
    if not 0.0 <= args.sde_last_step < 1.0:
        p.error(f"--sde-last-step must lie in [0, 1), got {args.sde_last_step}")
    if not (0.0 <= args.guidance_low <= args.guidance_high <= 1.0):
        p.error("--guidance-low/--guidance-high must satisfy 0 <= low <= high <= 1")
    check_backend_arg(p, args.backend, args.device)
    try:
        if args.official:
            from .convert import load_official
            from .methods import Method

            model = load_official(args.ckpt, args.official, flavor=args.flavor, key="model" if args.no_ema else None)
            method, models, meta = Method(), {"backbone": model}, {"value_range": None}
        else:
            ckpt = load_checkpoint(args.ckpt)
            method, models, meta = generator_from_checkpoint(ckpt, ema=not args.no_ema)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"effkernels-sample: error: {e}", file=sys.stderr)
        return 2
    extra = {}
    # only what differs from sample()'s defaults: the consistency and MaskDiT samplers take their own
    if gc != "auto":
        extra["guided_channels"] = None if gc == "all" else gc
    if args.sde_last_step != SDE_LAST_STEP:
        extra["sde_last_step"] = args.sde_last_step or None
    if args.heun_last_corrector:
        extra["heun_last_corrector"] = True
    if args.sparse_guidance is not None:
        if "tread" not in meta.get("method", "").split("+"):
            p.error(f"--sparse-guidance needs a TREAD checkpoint; {args.ckpt!r} was trained with {meta.get('method')!r}")
        extra["sparse_guidance"] = args.sparse_guidance
        for k in ("sparse_guidance_strong", "sparse_guidance_weak"):
            if getattr(args, k) is not None:
                extra[k] = getattr(args, k)  # the method checks the rate
    elif args.sparse_guidance_strong is not None or args.sparse_guidance_weak is not None:
        p.error("--sparse-guidance-strong/--sparse-guidance-weak go with --sparse-guidance")
    models = {k: m.to(args.device).eval() for k, m in models.items()}
    model = models["backbone"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ncls = args.num_classes or int(getattr(model, "num_classes", 1) or 1)
    eps_model = predicts_noise(model)
    sampler = args.sampler or ("ddpm" if eps_model else "heun")
    steps = args.steps or (250 if sampler in ("ddpm", "ddim") else 50)
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
                outs.append(method.sample(models, y, noise, sampler=sampler, steps=steps,
                                          cfg_scale=args.cfg_scale,
                                          guidance_interval=(args.guidance_low, args.guidance_high),
                                          generator=gen, clamp=value_range, **extra).cpu())
    except (ConfigError, ValueError) as e:  # the method cannot sample this way (sparse guidance without routes,
        # a flow sampler on a DiT model)
        print(f"effkernels-sample: error: {e}", file=sys.stderr)
        return 2
    images = torch.cat(outs)
    npz = args.out + ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
    np.savez(npz, images=images.float().numpy(), labels=labels.numpy())
    print(f"wrote {npz} ({args.num} samples)")
    if images.shape[1] in (1, 3) and value_range is not None:
        print(f"wrote {save_grid(images[:256], args.out + '.png', value_range=value_range)}")
    if args.vae:
        from .vae import VAEError, decode_latents, load_vae, save_pngs, to_uint8_nhwc

        try:
            decoded = decode_latents(load_vae(args.vae, device=args.device), images, batch_size=min(args.batch_size, 32))
        except (VAEError, ValueError) as e:
            print(f"effkernels-sample: error: {e}", file=sys.stderr)
            return 2
        pngs = save_pngs(decoded, args.out + "_png")
        np.savez(args.out + "_images.npz", arr_0=to_uint8_nhwc(decoded), labels=labels.numpy())
        print(f"wrote {len(pngs)} decoded PNGs to {args.out}_png/, {args.out}_images.npz and "
              f"{save_grid(decoded[:256], args.out + '_decoded.png', value_range=(-1.0, 1.0))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
