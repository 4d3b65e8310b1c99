"""Colour loss guidance from the Stable Diffusion deep dive (fast.ai, "Stable Diffusion Deep Dive").

loss = mean|image[channel] − target| per sample on the decoded predicted x0; every ``every`` steps
the latents move by the deep dive's correction x ← x − scale·σ²·∇ₓloss (the mechanism and its
options — σ window, gradient through the UNet, x0-space, normalisation, recurrence, decoder
checkpointing — are framework.loss_guidance's). Default: the deep dive's blue loss (channel 2 → 0.9,
scale 200, every 5 steps), gradient through the VAE decoder only.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.errors import ConfigError
from framework.loss_guidance import LossGuidance


@dataclass
class ColorLoss(LossGuidance):
    channel: int = 2
    target: float = 0.9
    scale: float = 200.0
    every: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channel not in (0, 1, 2):
            raise ConfigError(f"color_loss.channel must be 0 (red), 1 (green) or 2 (blue), got {self.channel}")

    def loss(self, images, state):
        return (images[:, self.channel] - self.target).abs().flatten(1).mean(1)
