"""Pre-computed VAE latents in the folder layouts DiT/SiT/REPA users bring, read per sample (never all
in RAM); batches.py gives the step-indexed batches the trainer streams from them through a worker pool.

Layouts (`detect_layout(root)`; `load_dataset` dispatches here for such folders):
  fast-DiT   <root>/features/{i}.npy, each (1, 4, H, W): SD-VAE latents already multiplied by 0.18215,
             and <root>/labels/{i}.npy, each (1,) int; also fast-DiT's own folder names
             imagenet256_features/ + imagenet256_labels/ (what its extract_features.py writes). Feature
             and label files pair by sorted name, as fast-DiT's CustomDataset pairs them.
  REPA       <root>/vae-sd/**/img-mean-std-XXXXXXXX.npy, each (8, H, W): the SD-VAE posterior's mean and
             std concatenated, unscaled (REPA's preprocessing/dataset_tools.py encode), labels in
             vae-sd/dataset.json ({"labels": [[relative file name, label], ...]}; images/dataset.json is
             read when vae-sd has none), and the raw images <root>/images/**/img*.png (uint8 RGB,
             0..255) paired with the latents by sorted order, as REPA's CustomDataset pairs them.
             Every use of a sample draws z = 0.18215 * (mean + std * eps) afresh (REPA's
             sample_posterior), with eps from that sample's seed (below).

Per-sample randomness (REPA's posterior draw, DiT's horizontal flip) comes from a seed that is a
function of (run seed, step, position in the global batch) only, so a resumed run, any number of
data-loader workers and any number of processes draw exactly the same values. The flip mirrors the
latent (DiT flips the image before encoding; the SD-VAE is close to flip-equivariant) together with
the raw image beside it.

Memory: the data set object holds file names and the labels (8 bytes a sample); a sample's arrays are
read (memory-mapped, then copied) when a batch needs it and dropped with the batch. A DataLoader holds
at most num_workers x prefetch_factor batches ahead of the step that consumes them.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from ..cache import cache_dir
from .arrays import ArrayDataset, DataError

SD_VAE_SCALE = 0.18215  # the SD-VAE's latent scale (DiT, SiT, REPA)
FAST_DIT_DIRS = (("features", "labels"), ("imagenet256_features", "imagenet256_labels"),
                 ("imagenet512_features", "imagenet512_labels"))


# -----------------------------------------------------------------------------------------------
# Layout detection
# -----------------------------------------------------------------------------------------------


def detect_layout(root: str) -> str | None:
    """'fast-dit', 'repa', or None (not a latent folder) for the directory `root`."""
    if not os.path.isdir(root):
        return None
    if os.path.isdir(os.path.join(root, "vae-sd")):
        return "repa"
    for f, lab in FAST_DIT_DIRS:
        if os.path.isdir(os.path.join(root, f)) and os.path.isdir(os.path.join(root, lab)):
            return "fast-dit"
    return None


def _walk(top: str, exts: tuple[str, ...]) -> list[str]:
    """Relative paths (with '/') of the files under `top` with one of `exts`, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(top):
        for fn in files:
            if fn.lower().endswith(exts):
                out.append(os.path.relpath(os.path.join(dirpath, fn), top).replace(os.sep, "/"))
    return sorted(out)


def _numeric_key(name: str):
    """Sort key that puts fast-DiT's 2.npy before 10.npy (names that are not integers sort after, by name).
    The pairing of features with labels is the same either way: both lists are sorted by one key."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _read_npy(path: str) -> np.ndarray:
    """One sample's array: memory-mapped, then copied, so the file's pages are not kept mapped."""
    try:
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except Exception as e:
        raise DataError(f"latent file {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e


# -----------------------------------------------------------------------------------------------
# The data set
# -----------------------------------------------------------------------------------------------


class LatentFolder(torch.utils.data.Dataset):
    """A fast-DiT or REPA latent folder: len(), labels in memory, samples read on demand.

    `ds[i]` is sample i without randomness (REPA: the posterior mean, scaled); `ds[(i, seed)]` draws the
    REPA posterior sample and (with hflip) the flip from `seed`. Items are dicts: x (C, H, W) float32,
    y int64, and "image" (3, H', W') uint8 when `with_image` and the layout has images.
    The trainer's interface of ArrayDataset: num_classes, channels, size, value_range (None: latents),
    extras (the names of the per-sample arrays it can carry), name, fingerprint(), in_memory().
    """

    streamed = True

    def __init__(self, root: str, *, hflip: bool = False, with_image: bool = False, num_classes: int | None = None):
        self.root, self.name, self.hflip, self.with_image = root, root, bool(hflip), bool(with_image)
        self.layout = detect_layout(root)
        if self.layout == "fast-dit":
            self._init_fast_dit()
        elif self.layout == "repa":
            self._init_repa()
        else:
            raise DataError(f"{root!r} is neither a fast-DiT (features/ + labels/) nor a REPA (vae-sd/) latent folder")
        if len(self.files) == 0:
            raise DataError(f"latent folder {root!r} holds no samples")
        if self.labels.min() < 0:
            raise DataError(f"latent folder {root!r}: labels must be >= 0, got {int(self.labels.min())}")
        self.num_classes = int(num_classes) if num_classes else int(self.labels.max()) + 1
        if int(self.labels.max()) >= self.num_classes:
            raise DataError(f"latent folder {root!r}: labels reach {int(self.labels.max())}, beyond "
                            f"{self.num_classes} classes")
        first = self._stored(0)
        self.channels = first.shape[0] // (2 if self.layout == "repa" else 1)
        self.size = first.shape[-1]
        if first.shape[-1] != first.shape[-2]:
            raise DataError(f"latent folder {root!r}: latents must be square, got {tuple(first.shape)}")
        self.value_range = None
        self.extras = ("image",) if self.images is not None else ()
        self.reads = 0  # samples read by this process (tests bound what a run loads)

    # --- layouts -------------------------------------------------------------------------------------
    def _init_fast_dit(self):
        fdir, ldir = next((os.path.join(self.root, f), os.path.join(self.root, lab)) for f, lab in FAST_DIT_DIRS
                          if os.path.isdir(os.path.join(self.root, f)) and os.path.isdir(os.path.join(self.root, lab)))
        feats = sorted(_walk(fdir, (".npy",)), key=_numeric_key)
        labs = sorted(_walk(ldir, (".npy",)), key=_numeric_key)
        if len(feats) != len(labs):
            raise DataError(f"fast-DiT folder {self.root!r}: {len(feats)} feature files but {len(labs)} label files")
        self.files = [os.path.join(fdir, f) for f in feats]
        self.images = None
        self.labels = _label_cache(self.root, [os.path.join(ldir, f) for f in labs])

    def _init_repa(self):
        vdir, idir = os.path.join(self.root, "vae-sd"), os.path.join(self.root, "images")
        feats = _walk(vdir, (".npy",))
        meta = next((p for p in (os.path.join(vdir, "dataset.json"), os.path.join(idir, "dataset.json"))
                     if os.path.isfile(p)), None)
        if meta is None:
            raise DataError(f"REPA folder {self.root!r}: no dataset.json in vae-sd/ (or images/) with the labels")
        try:
            with open(meta) as f:
                pairs = json.load(f)["labels"]
            labels = {str(k).replace("\\", "/"): int(v) for k, v in pairs}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta!r} must hold {{\"labels\": [[file, label], ...]}} "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
        if meta.startswith(idir):  # images/dataset.json names the images: pair by index, as REPA does
            names = _walk(idir, (".png", ".jpg", ".jpeg", ".npy"))
            lab = [labels.get(n) for n in names]
        else:
            lab = [labels.get(n) for n in feats]
        missing = [n for n, v in zip(feats, lab) if v is None]
        if missing or len(lab) != len(feats):
            raise DataError(f"{meta!r} has no label for {missing[:3] or 'some files'} ({len(feats)} latent files)")
        self.files = [os.path.join(vdir, f) for f in feats]
        self.labels = np.asarray(lab, np.int64)
        self.images = None
        if os.path.isdir(idir):
            imgs = [n for n in _walk(idir, (".png", ".jpg", ".jpeg", ".npy"))]
            if len(imgs) != len(feats):
                raise DataError(f"REPA folder {self.root!r}: {len(imgs)} images but {len(feats)} latent files "
                                "(they pair by sorted order)")
            self.images = [os.path.join(idir, n) for n in imgs]

    # --- samples -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.files)

    @property
    def x(self):
        raise DataError(f"{self.name!r} is streamed from disk and has no in-memory array x; this use needs "
                        "in-memory data (an .npz), e.g. REPA's 'dae' encoder: use a pretrained encoder with "
                        "--repa-image-key image, or precomputed features")

    def _stored(self, i: int) -> np.ndarray:
        a = _read_npy(self.files[i])
        want = 2 if self.layout == "repa" else 1
        if a.ndim == 4 and a.shape[0] == 1:  # fast-DiT saves each sample as a batch of one
            a = a[0]
        if a.ndim != 3 or (self.layout == "repa" and a.shape[0] % 2):
            raise DataError(f"latent file {self.files[i]!r}: expected ({'2C' if want == 2 else 'C'}, H, W)"
                            f"{' or (1, C, H, W)' if want == 1 else ''}, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise DataError(f"latent file {self.files[i]!r} contains NaN or inf")
        return a.astype(np.float32, copy=False)

    def _image(self, i: int) -> np.ndarray:
        path = self.images[i]
        try:
            if path.endswith(".npy"):
                im = np.load(path, allow_pickle=False)
                return np.ascontiguousarray(im.reshape(-1, *im.shape[-2:]))
            from PIL import Image

            with Image.open(path) as f:
                im = np.asarray(f.convert("RGB"))
            return np.ascontiguousarray(im.transpose(2, 0, 1))  # (3, H, W) uint8, as REPA's loader
        except Exception as e:
            raise DataError(f"image file {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        self.reads += 1
        a = torch.from_numpy(self._stored(i))
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        if self.layout == "repa":
            mean, std = a.chunk(2, dim=0)
            # REPA's sample_posterior: a fresh draw every time the sample is used
            z = mean if g is None else mean + std * torch.randn(mean.shape, generator=g)
            a = z * SD_VAE_SCALE
        flip = bool(self.hflip and g is not None and torch.rand((), generator=g) < 0.5)
        item = {"x": a.flip(-1) if flip else a, "y": torch.tensor(int(self.labels[i]))}
        if self.with_image and self.images is not None:
            im = torch.from_numpy(self._image(i))
            item["image"] = im.flip(-1) if flip else im
        return item

    # --- what the trainer's evaluation and caches need ------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.layout}:{len(self)}".encode())
        for p in self.files[:: max(1, len(self) // 64)]:  # a sample of the files: never reads all of them
            h.update(_read_npy(p).tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]

    def in_memory(self, max_samples: int = 4096, seed: int = 0) -> ArrayDataset:
        """A fixed seeded subset (at most max_samples, without randomness) as an in-memory ArrayDataset:
        the reference set of the trainer's small-CNN Frechet distance on streamed data."""
        n = min(len(self), int(max_samples))
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        items = [self[int(i)] for i in idx]
        return ArrayDataset(torch.stack([it["x"] for it in items]), torch.stack([it["y"] for it in items]),
                            self.num_classes, f"{self.name}[{n} of {len(self)}]", value_range=None)


def _label_cache(root: str, paths: list[str]) -> np.ndarray:
    """fast-DiT's labels, one tiny file each: read once and cached beside the metric caches (keyed by the
    folder, the file count and the label folder's mtime), since ImageNet has 1.28M of them."""
    st = os.stat(os.path.dirname(paths[0])) if paths else None
    key = hashlib.sha256(f"{os.path.abspath(root)}:{len(paths)}:{st.st_mtime_ns if st else 0}".encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir(), "latent_labels", key + ".npy")
    if len(paths) > 10_000 and os.path.isfile(cache):
        lab = np.load(cache, allow_pickle=False)
        if lab.shape == (len(paths),):
            return lab
    out = np.empty(len(paths), np.int64)
    for k, p in enumerate(paths):
        v = _read_npy(p).reshape(-1)
        if v.size != 1 or not np.issubdtype(v.dtype, np.integer):
            raise DataError(f"label file {p!r} must hold one integer, got {v.dtype} of shape {v.shape}")
        out[k] = int(v[0])
    if len(paths) > 10_000:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.save(cache, out)
    return out
