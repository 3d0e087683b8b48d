"""Pre-compute REPA target features for a data set once: `effkernels-features`.

    effkernels-features --data digits --encoder dae --out feats.npz
    effkernels-features --data imagenet_latents.npz --image-key image --value-range 0,255 \\
        --encoder dinov2-vitb14:/weights/dinov2_vitb14_pretrain.pth --out feats.npz
    effkernels-train --data feats.npz --method repa --repa-encoder precomputed:repa_dae

The output .npz holds the data's x and y, its per-sample extras, and one array per encoder named
`repa_<encoder name>` (dashes become underscores), shape (N, tokens, dim), on the token grid
`--grid` (default: the data's size / 2, the grid of every patch-2 config). The trainer loads it with
`--data feats.npz` and passes the features as batch extras; the method resamples them to its
model's grid if that differs. Stored as float16 by default: it halves the disk at ImageNet scale
(1.28M x 256 x 768 features: 503 GB in fp32, 252 GB in fp16), and the cosine loss is blind to fp16
rounding (relative 5e-4); values beyond fp16's range are an error (use --dtype float32).

A .npz loads with value range None: the trainer's samplers then do not clamp and no sample grid is
drawn, while FD/accuracy still work (the metric's classifier is keyed by pixels and labels, which are
unchanged, so digits reuses its cached classifier). Live pretrained encoders on such data need
--repa-value-range.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from ..data.sources import DataError, load_dataset
from ..methods import encoders as enc

FP16_MAX = float(np.finfo(np.float16).max)


def compute_features(encoder, images: torch.Tensor, num_tokens: int, *, batch_size: int = 256,
                     device: str = "cpu", dtype=np.float16) -> np.ndarray:
    """(N, num_tokens, dim) features of `images` in batches, on `device`, as a numpy array of `dtype`."""
    if isinstance(encoder, torch.nn.Module):
        encoder.to(device)
    out = np.empty((len(images), num_tokens, encoder.dim), dtype=dtype)
    for i in range(0, len(images), batch_size):
        z = enc.encode_tokens(encoder, images[i:i + batch_size].to(device), num_tokens).float().cpu()
        if dtype == np.float16 and bool((z.abs() > FP16_MAX).any()):
            raise enc.EncoderError(f"features exceed float16's range ({FP16_MAX}): use --dtype float32")
        out[i:i + len(z)] = z.numpy().astype(dtype)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effkernels-features", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="'digits', an image folder, or a .npz (see effkernels-train)")
    p.add_argument("--encoder", action="append", required=True, metavar="SPEC",
                   help="encoder spec as --repa-encoder takes it (dae, dinov2-vitb14:PATH, timm-<model>:PATH, "
                        "a registered name); repeatable")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--grid", type=int, default=None, help="token grid side (default: data size // 2)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype")
    p.add_argument("--image-key", default="x", help="the data's array the encoder sees: x, or an extra such as 'image'")
    p.add_argument("--value-range", default=None, metavar="LO,HI",
                   help="value range of the encoder's input (default: the data's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not a.out.endswith(".npz"):
        p.error(f"--out must be a .npz file, got {a.out!r}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    vr = None
    if a.value_range is not None:
        try:
            vr = tuple(float(v) for v in a.value_range.split(","))
            assert len(vr) == 2 and vr[1] > vr[0]
        except (ValueError, AssertionError):
            p.error(f"--value-range must be LO,HI with LO < HI, got {a.value_range!r}")
    try:
        ds = load_dataset(a.data)
        grid = a.grid if a.grid is not None else ds.size // 2
        if grid < 1:
            p.error(f"--grid must be >= 1, got {grid}")
        if a.image_key == "x":
            images = ds.x
        elif a.image_key in ds.extras:
            images = ds.extras[a.image_key]
        else:
            p.error(f"--image-key {a.image_key!r}: --data {a.data!r} has no such array "
                    f"(extras: {sorted(ds.extras) or 'none'})")
        vr = vr if vr is not None else ds.value_range
        arrays = {"x": ds.x.numpy(), "y": ds.y.numpy(), **{k: v.numpy() for k, v in ds.extras.items()}}
        dtype = np.float16 if a.dtype == "float16" else np.float32
        for spec in a.encoder:
            key = enc.feature_key(spec)
            if key in arrays and key not in ds.extras:
                p.error(f"--encoder {spec!r}: two encoders store under {key!r}")
            e = enc.build_encoder(spec, grid=grid)
            if hasattr(e, "prepare"):
                e.prepare(ds)
            if getattr(e, "uses_value_range", False):
                if vr is None:
                    p.error(f"--encoder {spec!r} needs the images' value range: give --value-range LO,HI")
                e.value_range = vr
            arrays[key] = compute_features(e, images, grid * grid, batch_size=a.batch_size, device=a.device,
                                           dtype=dtype)
            print(f"{key}: {arrays[key].shape} {arrays[key].dtype} from {spec}")
    except (DataError, enc.EncoderError) as e:
        print(f"effkernels-features: error: {e}", file=sys.stderr)
        return 2
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp.npz", dir=os.path.dirname(out))
    os.close(fd)
    try:  # written beside the target then renamed: a killed run never leaves a torn .npz
        np.savez(tmp, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the data private to this user
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {a.out}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
