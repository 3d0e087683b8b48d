"""Image files: (B, C, H, W) tensors to uint8 and PNG grids."""
from __future__ import annotations

import math
import os

import torch


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
