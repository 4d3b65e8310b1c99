"""Colour loss guidance from the Stable Diffusion deep dive (fast.ai, "Stable Diffusion Deep Dive").

loss = mean|image[channel] − target| per sample on the decoded predicted x0; every ``every`` steps
the latents move by a normalised correction x ← x − scale·σ·ĝ (ĝ: the gradient rescaled to unit RMS
per sample; the mechanism and its options — σ window, gradient through the UNet, x0-space,
recurrence, decoder checkpointing — are framework.bases.loss_guidance's). Default: the deep dive's blue
loss (channel 2 → 0.9), scale 0.5 at every second step with σ ≤ 5, gradient through the VAE
decoder only — measured on the bundled model (docs/guidance/defaults.md, v3): the loss falls to 0.12
of the unguided pictures' (mean blue 0.42 → 0.85) while the judge still finds the prompted colour and
shape in all 16 samples; the steps above σ = 5, where the layout forms, are left alone. The deep dive's own update
x ← x − 200·σ²·∇ₓloss is ``normalize=false scale=200``: its strength depends on the model's
gradients (on the bundled v2 model's 8×8 latents it dissolved the images into colour noise:
docs/guidance.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import ConfigError, LossGuidance


@dataclass
class ColorLoss(LossGuidance):
    channel: int = 2
    target: float = 0.9
    scale: float = 0.5
    normalize: bool = True
    every: int = 2
    sigma_hi: float | None = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channel not in (0, 1, 2):
            raise ConfigError(f"color_loss.channel must be 0 (red), 1 (green) or 2 (blue), got {self.channel}")

    def loss(self, images, context):
        return (images[:, self.channel] - self.target).abs().flatten(1).mean(1)
