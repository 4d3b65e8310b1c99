"""Palette loss guidance: pull every pixel towards the nearest of a set of colours.

loss = mean over pixels of min_k ‖pixel − c_k‖² (per sample), on the decoded predicted x0, applied
by framework.bases.loss_guidance (by default the normalised latent correction x ← x − scale·σ·ĝ, ĝ the
gradient at unit RMS per sample; ``normalize=false``: x ← x − scale·σ²·∇ₓloss). ``colours`` are
names of the bundled world's colours (red, green, blue, yellow, purple, orange, white, black, gray)
or hex codes ('#1f77b4'). The gradient of each pixel points to its nearest palette colour.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from framework.plugin import ConfigError, LossGuidance, world


def parse_colour(text: str) -> tuple[float, float, float]:
    """An RGB triple in [0, 1] from a world colour name or a '#rrggbb' hex code."""
    name = str(text).strip().lower()
    if name in world.RGB:
        return tuple(world.RGB[name])  # type: ignore[return-value]
    hexa = name.lstrip("#")
    if len(hexa) == 6:
        try:
            return tuple(int(hexa[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]
        except ValueError:
            pass
    raise ConfigError(f"palette colour '{text}' is neither a colour name ({', '.join(world.RGB)}) nor a hex code like '#1f77b4'")


@dataclass
class Palette(LossGuidance):
    colours: list[str] = field(default_factory=lambda: ["blue", "white"])
    scale: float = 0.5
    normalize: bool = True
    every: int = 2
    sigma_hi: float | None = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.colours:
            raise ConfigError("palette.colours is empty: give at least one, e.g. 'guidance.palette.colours=[blue,white]'")
        self._rgb = torch.tensor([parse_colour(c) for c in self.colours])

    def loss(self, images, context):
        pal = self._rgb.to(images.device, images.dtype)                      # [K, 3]
        dist = (images[:, None] - pal[None, :, :, None, None]).pow(2).sum(2)  # [n, K, H, W]
        return dist.min(1).values.flatten(1).mean(1)
