"""Target encoders for representation alignment (REPA): the protocol, the built-in encoders, specs.

The protocol is small, so any nn.Module (or plain object) can be a target encoder:
    encode(images (B, C, H, W)) -> (B, N_enc, D_enc)   patch tokens, row-major on a square grid
    dim                                                  D_enc
  optional:
    prepare(ds)          called once with the training data set before the first encode (the
                         data-trained encoder fits or loads itself here)
    value_range          (lo, hi) of the images it is handed; set by the caller from the data (or
                         --repa-value-range) when the encoder declares `uses_value_range = True`
`encode` takes the data's images in the data's value range and does its own preprocessing. The
caller (the REPA method, the features CLI) resamples the token grid to the DiT's with
`resample_tokens`, runs the encoder frozen (eval, no grad) and never trains it.

Built-in specs (`build_encoder(spec, grid=...)`, what `--repa-encoder` / `--encoder` take):
  dae                       a small convolutional masked-denoising autoencoder that the library trains
                            on the data set itself (reconstruction only, labels never seen) and caches
                            beside the metric's classifier; the default for small data such as digits
  dinov2-vit{s,b,l,g}14[-reg]:PATH
                            DINOv2 through timm from a LOCAL weights file, never a download
  timm-<timm model name>:PATH
                            any timm ViT the same way (e.g. timm-vit_base_patch14_dinov2)
  precomputed:KEY           features pre-computed by `effkernels-features`, read from the batch
  <registered name>[:ARG]   an encoder added with `register_encoder(name, factory)`
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import cache_dir, load_or_fit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DAE_VERSION = "v4"  # bump when the autoencoder's architecture or recipe changes: invalidates caches


class EncoderError(ValueError):
    """A target encoder that cannot be built: bad spec, missing or mismatched weights file (named)."""


# -----------------------------------------------------------------------------------------------
# Token grids
# -----------------------------------------------------------------------------------------------


def grid_of(n: int, what: str = "tokens") -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise EncoderError(f"{what}: {n} tokens do not form a square grid")
    return g


def resample_tokens(z: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N_enc, D) on a square grid -> (B, num_tokens, D) on the DiT's square grid.

    Downsampling is area pooling (adaptive average): every encoder token contributes to the DiT token
    whose image area it covers, so nothing is skipped or aliased (a bicubic/bilinear downsample samples
    a few positions and drops the tokens between them). Upsampling is bilinear: area/nearest would copy
    one token into blocks of identical targets, and bicubic overshoots on feature maps. Equal grids are
    passed through untouched (REPA picks the encoder's resolution so that they are equal).
    """
    if z.dim() != 3:
        raise EncoderError(f"encoder tokens must be (B, N, D), got shape {tuple(z.shape)}")
    n = z.shape[1]
    if n == num_tokens:
        return z
    g_in, g_out = grid_of(n, "encoder output"), grid_of(num_tokens, "DiT")
    fmap = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], g_in, g_in)
    if g_out < g_in:
        fmap = F.adaptive_avg_pool2d(fmap.float(), g_out)
    else:
        fmap = F.interpolate(fmap.float(), size=(g_out, g_out), mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2).to(z.dtype).contiguous()


def to_unit_range(x: torch.Tensor, value_range) -> torch.Tensor:
    """Images from `value_range` (lo, hi) to [0, 1], float32."""
    if value_range is None:
        raise EncoderError("this encoder needs the images' value range (lo, hi) to map them to [0, 1]; the data "
                           "has none (a .npz): give --repa-value-range LO,HI")
    lo, hi = (float(v) for v in value_range)
    return (x.float() - lo) / (hi - lo)


# -----------------------------------------------------------------------------------------------
# timm ViTs (DINOv2) from a local file
# -----------------------------------------------------------------------------------------------

DINOV2 = {f"dinov2-vit{s}14{r}": f"vit_{name}_patch14{'_reg4' if r else ''}_dinov2"
          for s, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")) for r in ("", "-reg")}


def load_weights_file(path: str) -> dict:
    """A state dict from a local .pth/.pt (torch.load, weights only: no arbitrary unpickling) or
    .safetensors file; {'model': sd} / {'state_dict': sd} wrappers are unwrapped."""
    if not os.path.isfile(path):
        raise EncoderError(f"encoder weights file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderError(f"encoder weights file {path!r} cannot be read as a state dict "
                           f"({type(e).__name__}: {str(e)[:200]})") from e
    for k in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(k), dict):
            sd = sd[k]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise EncoderError(f"encoder weights file {path!r} does not hold a state dict of tensors")
    return sd


class TimmEncoder(nn.Module):
    """A timm ViT's patch tokens after the final norm (no CLS / register tokens), REPA's preprocessing.

    Preprocessing (REPA's): images from their value range to [0, 1], grey repeated to RGB, ImageNet
    mean/std normalisation, bicubic resize to `resolution`. The default resolution is patch x grid
    (224 for DINOv2/14 on a 16x16 DiT grid, REPA's setting), so the encoder's token grid IS the DiT's.

    Weights come from `path` only (pretrained=False: nothing is downloaded). Layouts that load:
    facebookresearch/dinov2's hub checkpoints (dinov2_vitb14_pretrain.pth: `mask_token`, `pos_embed`
    at 37x37, `register_tokens` for -reg, SwiGLU `w12/w3` for giant) and timm's own state dicts
    (e.g. the model.safetensors of timm/vit_base_patch14_dinov2.lvd142m), both through timm's
    `checkpoint_filter_fn`, which also resamples the position table to this resolution (bicubic).
    Anything else (missing, unexpected or mis-shaped keys) is an EncoderError naming the file.

    The constructor builds the architecture on the meta device only (dim and grid, no memory, no file
    read); the weights load in `prepare()` (the trainer's attach) or on the first encode. So a method
    rebuilt from a checkpoint for sampling, which never runs the encoder, needs no weights file.
    """

    uses_value_range = True

    def __init__(self, model_name: str, path: str, *, grid: int | None = None, resolution: int | None = None,
                 value_range=(-1.0, 1.0), model_kwargs: dict | None = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise EncoderError("timm encoders need timm: pip install 'effkernels[encoders]'") from e
        self.model_kwargs = dict(model_kwargs or {})
        try:
            with torch.device("meta"):
                probe = timm.create_model(model_name, pretrained=False, num_classes=0, **self.model_kwargs)
        except Exception as e:
            raise EncoderError(f"timm cannot build {model_name!r}: {type(e).__name__}: {e}") from e
        if resolution is None:
            if grid is None:
                raise EncoderError("TimmEncoder needs the DiT's token grid or an explicit resolution")
            resolution = int(probe.patch_embed.patch_size[0]) * int(grid)
        self.model_name, self.path, self.resolution = model_name, path, int(resolution)
        self.dim = int(probe.num_features)
        self.model = None
        self.value_range = value_range
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prepare(self, ds=None) -> None:
        """Build the model at `resolution` and load the weights file (once)."""
        if self.model is not None:
            return
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        sd = load_weights_file(self.path)
        name, path = self.model_name, self.path
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, img_size=self.resolution,
                                      **self.model_kwargs)
        except Exception as e:
            raise EncoderError(f"timm cannot build {name!r} at {self.resolution}px: {type(e).__name__}: {e}") from e
        try:
            sd = checkpoint_filter_fn(dict(sd), model)
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except Exception as e:  # size mismatches raise here, even with strict=False
            raise EncoderError(f"encoder weights file {path!r} does not fit {name} "
                               f"({type(e).__name__}: {str(e)[:400]})") from e
        unexpected = [k for k in unexpected if not k.startswith("head.")]  # a classifier head is not used
        if missing or unexpected:
            raise EncoderError(f"encoder weights file {path!r} does not fit {name}: missing keys "
                               f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected keys "
                               f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
        self.model = model.eval().requires_grad_(False).to(self.mean.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_range(images, self.value_range)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise EncoderError(f"{self.model_name} takes grey or RGB images, got {x.shape[1]} channels")
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.prepare()
        feats = self.model.forward_features(self.preprocess(images))  # (B, prefix + N, D), after the final norm
        return feats[:, self.model.num_prefix_tokens:]

    forward = encode


# -----------------------------------------------------------------------------------------------
# The data-trained encoder: a masked-denoising convolutional autoencoder
# -----------------------------------------------------------------------------------------------


class DenoisingAutoencoder(nn.Module):
    """conv(C,32)-conv(32,dim, stride 2)-conv(dim,dim) -> a (dim, S/2, S/2) feature map, one token per
    2x2 pixels (the patch-2 DiT's grid); a transposed-conv decoder reconstructs the image from it."""

    def __init__(self, in_channels: int, dim: int = 64, width: int = 32):
        super().__init__()
        self.config = {"in_channels": in_channels, "dim": dim, "width": width}
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, dim, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.GELU(), nn.ConvTranspose2d(dim, width, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, in_channels, 3, padding=1),
        )

    def feature_map(self, x):
        return self.encoder(x.float())

    def forward(self, x):  # reconstruction
        return self.decoder(self.feature_map(x))[..., :x.shape[-2], :x.shape[-1]]


def _corrupt(x: torch.Tensor, g: torch.Generator, mask_ratio: float, noise: float, fill: torch.Tensor):
    """Mask random 2x2 blocks (set to the data mean) and add Gaussian noise: reconstructing the clean
    image then needs context from neighbouring patches, so the features are not a per-pixel copy."""
    b, _, h, w = x.shape
    m = torch.rand(b, 1, (h + 1) // 2, (w + 1) // 2, generator=g) < mask_ratio
    m = m.repeat_interleave(2, 2).repeat_interleave(2, 3)[..., :h, :w]
    x = torch.where(m, fill, x)
    return x + noise * torch.randn(x.shape, generator=g)


def train_dae(ds, *, dim: int = 64, width: int = 32, epochs: int = 15, batch_size: int = 128, lr: float = 3e-3,
              mask_ratio: float = 0.3, noise: float = 0.2, seed: int = 0, verbose: bool = False):
    """Fit a DenoisingAutoencoder to ds.x (labels unused). Returns (net, info) with the final
    reconstruction MSE of clean inputs, measured in units of the data's variance. On digits
    (1797 8x8 images) 15 epochs take ~15 s on one CPU thread and reconstruct to ~4% of the variance.
    All its randomness comes from `seed` (the global RNG forked and seeded): the net does not depend on
    the caller's RNG state, and the caller's stream is the same whether it trained or loaded a cache."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _train_dae(ds, dim, width, epochs, batch_size, lr, mask_ratio, noise, seed, verbose)


def _train_dae(ds, dim, width, epochs, batch_size, lr, mask_ratio, noise, seed, verbose):
    x = ds.x.float()
    g = torch.Generator().manual_seed(seed)
    net = DenoisingAutoencoder(ds.channels, dim, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    std = x.std().clamp_min(1e-6)
    fill = x.mean()
    t0 = time.time()
    net.train()
    with torch.enable_grad():
        for ep in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                xb = x[perm[i:i + batch_size]]
                loss = F.mse_loss(net(_corrupt(xb, g, mask_ratio, noise * std, fill)), xb) / std ** 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(f"dae epoch {ep + 1}/{epochs} loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        rec = sum(F.mse_loss(net(x[i:i + 512]), x[i:i + 512], reduction="sum").item()
                  for i in range(0, len(x), 512)) / x.numel() / float(std) ** 2
    return net, {"recon_mse": rec, "train_s": time.time() - t0}


# The whole recipe (train_dae's defaults) keys the cache, so a changed default retrains.
DAE_RECIPE = {k: v.default for k, v in inspect.signature(train_dae).parameters.items()
              if v.kind is inspect.Parameter.KEYWORD_ONLY and k != "verbose"}


class DataEncoder(nn.Module):
    """The `dae` spec: an autoencoder trained on the training data itself, cached on disk.

    Fitted in `prepare(ds)`: loaded from <cache>/repa_encoder/<data fingerprint>-<config hash>-<version>.pt
    if present, else trained (reconstruction only) and saved there. The cache folder is the metric's
    (EFFKERNELS_CACHE or ~/.cache/effkernels), the file is its own: this is NOT the metric's
    classifier, shares none of its weights, and never sees a label. Aligning to the network that scores
    the samples, or to a classifier at all, would flatter the method's FD/accuracy numbers.
    Images are taken as they are in the data (it was trained on them), whatever their range.
    """

    uses_value_range = False

    def __init__(self, dim: int = 64, *, cache: str | None = None, **train_kw):
        super().__init__()
        self.dim = int(dim)
        unknown = set(train_kw) - set(DAE_RECIPE)
        if unknown:
            raise EncoderError(f"dae: unknown settings {sorted(unknown)}; known: {sorted(DAE_RECIPE)}")
        self.train_kw = {**DAE_RECIPE, **train_kw, "dim": self.dim}
        self.cache = cache
        self.net: DenoisingAutoencoder | None = None
        self.info: dict = {}

    def cache_path(self, ds) -> str:
        key = json.dumps({"channels": ds.channels, **self.train_kw}, sort_keys=True)
        h = hashlib.sha256(key.encode()).hexdigest()[:8]
        return os.path.join(self.cache or cache_dir(), "repa_encoder", f"{ds.fingerprint()}-{h}-{_DAE_VERSION}.pt")

    def prepare(self, ds, *, retrain: bool = False, verbose: bool = False) -> None:
        if self.net is not None and not retrain:
            return
        path = self.cache_path(ds)
        net, info, loaded = load_or_fit(path, DenoisingAutoencoder,
                                        lambda: train_dae(ds, verbose=verbose, **self.train_kw),
                                        retrain=retrain, what="repa encoder cache")
        self._set(net, {**info, "cached": loaded, "path": path})

    def _set(self, net, info):
        self.net = net.eval().requires_grad_(False)  # on the CPU; the method moves it to the data's device
        self.info = info

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise EncoderError("the 'dae' encoder is not fitted yet: call prepare(ds) (the REPA method does it "
                               "in attach(trainer))")
        return self.net.feature_map(images).flatten(2).transpose(1, 2)  # (B, (S/2)^2, dim)

    forward = encode


# -----------------------------------------------------------------------------------------------
# Pre-computed features (effkernels-features) and the spec registry
# -----------------------------------------------------------------------------------------------


class Precomputed:
    """Features stored beside the data (batch[key], (B, N, dim)): the method reads them, runs nothing."""

    precomputed = True
    uses_value_range = False

    def __init__(self, key: str, dim: int):
        self.key, self.dim = key, int(dim)

    def encode(self, images):
        raise EncoderError(f"precomputed features {self.key!r} are read from the batch, not computed")


ENCODERS: dict[str, Callable] = {}


def register_encoder(name: str):
    """Decorator: ENCODERS[name] = factory(arg: str | None, *, grid: int) -> an encoder (the protocol).
    `--repa-encoder name:arg` then builds it (arg None without the colon)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_encoder: name must be a non-empty string without ':', got {name!r}")

    def deco(factory):
        ENCODERS[name] = factory
        return factory
    return deco


@register_encoder("dae")
def _dae(arg, *, grid):
    if arg:
        raise EncoderError(f"'dae' takes no argument, got {arg!r}")
    return DataEncoder()


def feature_key(spec: str) -> str:
    """The array name under which effkernels-features stores spec's features: 'repa_<name>'."""
    name = spec.split(":", 1)[0]
    return "repa_" + "".join(c if c.isalnum() else "_" for c in name)


def build_encoder(spec: str, *, grid: int, precomputed_dims: Callable | None = None):
    """An encoder from a spec string (see the module docstring). `grid` is the DiT's token grid side;
    `precomputed_dims(key) -> dim` tells a precomputed spec its feature width (read from the data)."""
    if not isinstance(spec, str) or not spec:
        raise EncoderError(f"encoder spec must be a non-empty string, got {spec!r}")
    name, _, arg = spec.partition(":")
    arg = arg or None
    if name == "precomputed":
        if not arg:
            raise EncoderError("'precomputed' needs the array name: precomputed:repa_<encoder>")
        if precomputed_dims is None:
            raise EncoderError(f"{spec!r}: precomputed features need the data file to read their width from")
        return Precomputed(arg, precomputed_dims(arg))
    if name in DINOV2 or name.startswith("timm-"):
        model = DINOV2.get(name, name[len("timm-"):])
        if not arg:
            raise EncoderError(f"{name!r} needs a local weights file: {name}:/path/to/weights.pth "
                               "(nothing is downloaded)")
        return TimmEncoder(model, arg, grid=grid)
    if name in ENCODERS:
        return ENCODERS[name](arg, grid=grid)
    raise EncoderError(f"unknown encoder {name!r}; known: dae, precomputed:KEY, "
                       f"{', '.join(sorted(DINOV2))} (name:PATH), timm-<model>:PATH"
                       + (f", {', '.join(sorted(set(ENCODERS) - {'dae'}))}" if set(ENCODERS) - {"dae"} else ""))


def freeze(encoder):
    """Eval mode and no gradients, for an nn.Module encoder (a plain object is left as it is)."""
    if isinstance(encoder, nn.Module):
        encoder.eval().requires_grad_(False)
    return encoder


@torch.no_grad()
def encode_tokens(encoder, images: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The frozen encoder's tokens of `images`, resampled to `num_tokens` (a square grid), contiguous.
    Runs under no_grad with the encoder in eval mode (a trainer's .train() never reaches it)."""
    freeze(encoder)
    z = encoder.encode(images)
    if not torch.is_tensor(z) or z.dim() != 3 or z.shape[0] != images.shape[0]:
        raise EncoderError(f"{type(encoder).__name__}.encode must return (B={images.shape[0]}, N, D), got "
                           f"{tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
    if z.shape[2] != encoder.dim:
        raise EncoderError(f"{type(encoder).__name__}.encode returned width {z.shape[2]}, but its dim is {encoder.dim}")
    return resample_tokens(z, num_tokens).contiguous()
