"""The SD-VAE that DiT/SiT/REPA latents come from, to decode samples into images (diffusers, local only).

    vae = load_vae("/models/sd-vae-ft-ema")          # a diffusers AutoencoderKL folder (config.json + weights)
    images = decode_latents(vae, samples)             # (N, 4, 32, 32) scaled latents -> (N, 3, 256, 256) in [-1, 1]
    effkernels-sample --ckpt last.pt --out runs/s --vae /models/sd-vae-ft-ema   # writes decoded PNGs

The folder is what `AutoencoderKL.save_pretrained` writes (stabilityai/sd-vae-ft-ema or -mse as
downloaded from the Hub by the user beforehand); it is read with local_files_only, never fetched.
Latents are divided by the scale (0.18215, the SD-VAE's; DiT, SiT and REPA train on z * 0.18215)
before decoding, as DiT's sample.py does. Needs `pip install 'effkernels[vae]'` (diffusers).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .latents import SD_VAE_SCALE


class VAEError(ValueError):
    """A VAE folder that cannot be loaded (missing, not a diffusers AutoencoderKL), named in the message."""


def load_vae(path: str, device="cpu", dtype=torch.float32):
    """A diffusers AutoencoderKL from a local folder, in eval mode, frozen."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEError("--vae needs diffusers: pip install 'effkernels[vae]'") from e
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise VAEError(f"VAE folder {path!r} must be a diffusers AutoencoderKL folder with config.json "
                       "(as AutoencoderKL.save_pretrained writes it)")
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    except Exception as e:
        raise VAEError(f"VAE folder {path!r} cannot be loaded as an AutoencoderKL "
                       f"({type(e).__name__}: {str(e)[:300]})") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale: float = SD_VAE_SCALE, batch_size: int = 32) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, H, W) float32 in [-1, 1] (clamped), on the CPU."""
    cfg_c = int(getattr(vae.config, "latent_channels", latents.shape[1]))
    if latents.dim() != 4 or latents.shape[1] != cfg_c:
        raise ValueError(f"decode_latents: latents must be (N, {cfg_c}, h, w) for this VAE, got {tuple(latents.shape)}")
    if not scale > 0:
        raise ValueError(f"decode_latents: scale must be > 0, got {scale}")
    p = next(vae.parameters())
    out = []
    for i in range(0, len(latents), batch_size):
        z = latents[i:i + batch_size].to(p.device, p.dtype) / scale
        out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), rounded as DiT's sample.py: the ADM evaluator's arr_0."""
    return (images.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_pngs(images: torch.Tensor, folder: str) -> list[str]:
    """One PNG per image, 000000.png ...; returns the paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, a in enumerate(to_uint8_nhwc(images)):
        path = os.path.join(folder, f"{i:06d}.png")
        Image.fromarray(a).save(path)
        paths.append(path)
    return paths
