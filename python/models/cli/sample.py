"""The `effkernels-sample` CLI: a PNG grid and an .npz (images, labels) from a checkpoint's EMA
generator, or from an official DiT/SiT/REPA checkpoint, through the method's own sampler
(samplers.py for the flow and DDPM/DDIM samplers)."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import effkernels
from effkernels.backends import BACKENDS

from ..checkpoint import CheckpointError, load_checkpoint
from ..data.vae import VAEError, decode_latents, load_vae, save_pngs, to_uint8_nhwc
from ..interop.official import FLAVORS, load_official
from ..methods import ConfigError, Method
from ..objectives.prediction import predicts_noise
from ..sampling.images import save_grid
from ..sampling.samplers import SAMPLERS, SDE_LAST_STEP
from ..train.rebuild import generator_from_checkpoint
from .args import check_backend_arg
from .presets import add_preset_arg, announce, apply_preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effkernels-sample",
        description="Sample a PNG grid and an .npz (images, labels) from a checkpoint's EMA weights.")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by effkernels-train, or an official DiT/SiT/REPA/LightningDiT one with --official")
    p.add_argument("--official", default=None, metavar="CONFIG",
                   help="--ckpt is an official checkpoint of this config (DiT-XL/2, SiT-XL/2, LightningDiT-XL/1: SiT's "
                        "time and learned sigma adapted; REPA recognised by its keys), loaded with load_official")
    p.add_argument("--flavor", default=None, choices=FLAVORS,
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
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="a local diffusers AutoencoderKL folder: decode the latents (/ 0.18215) and write "
                        "<out>_png/*.png, the grid <out>_decoded.png and <out>_images.npz (uint8 arr_0, ADM's layout)")
    add_preset_arg(p)
    return p


def _positive(p, name, value):
    if value < 1:
        p.error(f"{name} must be >= 1, got {value}")


def main(argv=None) -> int:
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
