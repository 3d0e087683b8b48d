"""Data sets for the trainer, all held in memory as tensors (B, C, H, W) with integer labels.

Sources (`load_dataset(spec)`):
  "digits"         scikit-learn's 1797 8x8 grey digits (shipped inside scikit-learn, no download),
                   pixel values 0..16 scaled to [-1, 1], shape (1797, 1, 8, 8), 10 classes.
  "digits:S"       the same digits bilinearly upsampled to SxS (e.g. "digits:16": 256 tokens at patch
                   1), a longer-sequence setting on shipped data for the CPU.
  <folder>         an image folder with one subfolder per class (sorted names -> labels 0..K-1),
                   loaded with PIL, resized to `image_size`, scaled to [-1, 1].
  <file>.npz       pre-computed latents: array "x" (or "latents"/"images"), (N, C, H, W) float, and
                   "y" (or "labels"), (N,) int; how DiT users train on ImageNet (VAE latents).
                   Every other array with N rows is a per-sample extra (e.g. "feat": pre-computed
                   encoder features beside the latents, "image": the raw image beside its latent),
                   kept in `extras` and passed to a method that asks for it (Method.batch_keys).
  <file>.npy       latents (N, C, H, W); labels from <file-stem>_labels.npy if it exists, else all 0.
  <latent folder>  fast-DiT's features/ + labels/ or REPA's vae-sd/ (+ images/): effkernels.models.data.latents,
                   read per sample by a worker pool, never all in memory.
The value range of images is [-1, 1]; for latents it is None (unbounded: samplers do not clamp).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .arrays import ArrayDataset, DataError
from .latents import LatentFolder, detect_layout

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# -----------------------------------------------------------------------------------------------
# Sources
# -----------------------------------------------------------------------------------------------


def load_digits(size: int = 8) -> ArrayDataset:
    """scikit-learn's 8x8 digits scaled to [-1, 1]; bilinearly upsampled to size x size when size > 8
    (bilinear, not bicubic: a convex combination of pixels stays inside [-1, 1])."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise DataError(f"digits: size must be an int >= 8, got {size!r}")
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - scikit-learn is in the train extra
        raise DataError("data 'digits' needs scikit-learn (pip install scikit-learn)") from e
    d = _load()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    if size == 8:
        return ArrayDataset(x, y, 10, "digits")
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ArrayDataset(x.contiguous(), y, 10, f"digits:{size}")


def load_image_folder(root: str, image_size: int | None = None, channels: int | None = None) -> ArrayDataset:
    """One subfolder per class; images resized (bicubic) to image_size, grey (1) or RGB (3) channels."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover
        raise DataError("image folders need pillow (pip install pillow)") from e
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"image folder {root!r} has no class subfolders (expected <root>/<class>/<image>)")
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for fn in sorted(os.listdir(os.path.join(root, cls))):
            if not fn.lower().endswith(IMAGE_EXTS):
                continue
            path = os.path.join(root, cls, fn)
            try:
                with Image.open(path) as im:
                    if channels is None:
                        channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
                    im = im.convert("L" if channels == 1 else "RGB")
                    if image_size is None:
                        image_size = min(im.size)
                    if im.size != (image_size, image_size):
                        im = im.resize((image_size, image_size), Image.BICUBIC)
                    arr = np.asarray(im, dtype=np.float32)
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"image file {path!r} cannot be read ({type(e).__name__}: {e})") from e
            xs.append(arr.reshape(image_size, image_size, channels))
            ys.append(label)
    if not xs:
        raise DataError(f"image folder {root!r} has no images with extensions {IMAGE_EXTS}")
    x = torch.from_numpy(np.stack(xs) / 127.5 - 1.0).float().permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(x, torch.tensor(ys, dtype=torch.int64), len(classes), root)


def _pick(npz, names, path, what):
    for n in names:
        if n in npz.files:
            return n, npz[n]
    raise DataError(f"latent file {path!r} has no {what} array (looked for {', '.join(names)}; found "
                    f"{', '.join(npz.files) or 'nothing'})")


def load_latents(path: str) -> ArrayDataset:
    """.npz with x/latents/images and y/labels, or .npy with an optional <stem>_labels.npy beside it."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                xk, x = _pick(z, ("x", "latents", "images"), path, "latent")
                yk, y = _pick(z, ("y", "labels"), path, "label")
                extras = {k: z[k] for k in z.files if k not in (xk, yk)}
        else:
            x = np.load(path, allow_pickle=False)
            lab = path[:-4] + "_labels.npy"
            y = np.load(lab, allow_pickle=False) if os.path.isfile(lab) else np.zeros(len(x), np.int64)
            extras = {}
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"latent file {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"latent file {path!r}: latents must be a numeric (N, C, H, W) array, got {x.dtype} {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"latent file {path!r}: labels must be an integer (N,) array, got {y.dtype} {y.shape}")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    ncls = int(yt.max()) + 1 if len(yt) else 1
    ext = {}
    for k, v in extras.items():
        if not np.issubdtype(v.dtype, np.number) and v.dtype != np.bool_:
            raise DataError(f"latent file {path!r}: extra array {k!r} must be numeric, got {v.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(v))
        ext[k] = t.float() if t.is_floating_point() else t
    return ArrayDataset(xt, yt, ncls, path, value_range=None, extras=ext)


def load_dataset(spec: str, image_size: int | None = None) -> ArrayDataset:
    """'digits', an image folder, or a .npz/.npy latent file (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise DataError(f"data must be 'digits' or a path, got {spec!r}")
    if spec == "digits":
        return load_digits()
    if spec.startswith("digits:"):
        size = spec.split(":", 1)[1]
        if not size.isdigit():
            raise DataError(f"data {spec!r}: expected 'digits:SIZE' with an integer SIZE >= 8, e.g. 'digits:16'")
        return load_digits(int(size))
    if not os.path.exists(spec):
        raise DataError(f"data path {spec!r} does not exist (use 'digits', an image folder, or a .npz/.npy file)")
    if os.path.isdir(spec):
        if detect_layout(spec):  # fast-DiT features/ + labels/, REPA vae-sd/: streamed, never all in RAM
            return LatentFolder(spec)
        return load_image_folder(spec, image_size=image_size)
    if spec.endswith((".npz", ".npy")):
        return load_latents(spec)
    raise DataError(f"data file {spec!r} is neither .npz nor .npy (image data must be a folder of class subfolders)")
