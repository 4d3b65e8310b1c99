"""Image helpers: tensors in [0, 1] to PNG bytes, and grids."""
from __future__ import annotations

import io
import math

import torch
from PIL import Image


def to_pil(img: torch.Tensor) -> Image.Image:
    """A [3, H, W] (or [1, H, W]) tensor in [0, 1] (or uint8 in [0, 255]) as an RGB PIL image."""
    arr = img.detach().cpu() if img.dtype == torch.uint8 else (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")


def png_bytes(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile a batch [B, C, H, W] into one image, ``nrow`` per row (√B by default)."""
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    out = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=images.dtype)
    for k in range(b):
        r, col = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[:, y : y + h, x : x + w] = images[k].detach().cpu()
    return out
