"""Gaussian blurs on image grids, shared by the perturbation guidance of the network (SEG's blurred
query) and SAG's blurred prediction."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_of(tokens: int, aspect: float) -> tuple[int, int]:
    """(h, w) of a grid of ``tokens`` tokens with h/w = ``aspect``; when the count does not factor
    that way, the leading ⌊√L⌋² tokens as a square (diffusers' rule for SEG)."""
    h = max(1, round(math.sqrt(tokens * aspect)))
    if tokens % h == 0 and abs(h / (tokens // h) - aspect) < 1e-6:
        return h, tokens // h
    side = math.isqrt(tokens)
    return side, side


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """``img`` [B, C, H, W] convolved with a normalised Gaussian of ``sigma`` pixels sampled at
    ``kernel_size`` taps (odd; capped per axis at the size, or the size + 1 when even, as diffusers
caps SEG's kernel), reflected borders; separable,
    so the same as the 2-D kernel exp(−(x² + y²)/2σ²)/Σ."""
    c = img.shape[1]
    for dim in (2, 3):
        k = min(kernel_size, img.shape[dim] - (img.shape[dim] % 2 - 1))
        if k < 2:
            continue
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
        kern = torch.exp(-0.5 * (x / sigma) ** 2)
        kern = (kern / kern.sum()).to(img)
        shape = (1, 1, k, 1) if dim == 2 else (1, 1, 1, k)
        pad = (0, 0, k // 2, k // 2) if dim == 2 else (k // 2, k // 2, 0, 0)
        img = F.conv2d(F.pad(img, pad, mode="reflect"), kern.reshape(shape).expand(c, -1, -1, -1), groups=c)
    return img


def blur_tokens(q: torch.Tensor, sigma: float, aspect: float, image_tokens: int | None = None) -> torch.Tensor:
    """Tokens [B, L, C] blurred on their image grid (:func:`grid_of`), SEG's query blur: a Gaussian
    of ``sigma`` tokens with ⌈6σ⌉ + 1 taps rounded down to odd, or (σ = ∞) every grid token replaced
    by the grid's mean; tokens outside the grid unchanged. With ``image_tokens`` (a transformer's
    image token count) and more tokens than that, the image tokens are the *last* ones (Flux's
    single blocks put the text first) and the grid is theirs."""
    b, n, c = q.shape
    start = n - image_tokens if image_tokens is not None and n > image_tokens else 0
    h, w = grid_of(n - start, aspect)
    img = q[:, start:start + h * w].transpose(1, 2).reshape(b, c, h, w)
    if math.isinf(sigma):
        img = img.mean(dim=(2, 3), keepdim=True).expand(b, c, h, w)
    else:
        img = gaussian_blur_2d(img, math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2, sigma)
    return torch.cat([q[:, :start], img.reshape(b, c, h * w).transpose(1, 2), q[:, start + h * w:]], dim=1)
