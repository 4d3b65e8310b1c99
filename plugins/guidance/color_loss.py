"""Colour loss guidance from the Stable Diffusion deep dive (fast.ai, "Stable Diffusion Deep Dive").

Every ``every`` steps, at the step's first evaluation: decode the predicted x0, take
loss = scale·mean|image[channel] − target| per sample, and move the latents by the deep dive's
correction x ← x − σ²·∇ₓloss, keeping the noise prediction as computed (``Prediction.shifted``).
∇ₓ = ∇ through D at fixed ε (x0 = x − σ·ε), i.e. the gradient flows through the VAE decoder only.
The loss is summed over samples so each sample's correction is independent of the batch (with one
sample it is the deep dive's mean). Default: the deep dive's blue loss (channel 2 → 0.9, scale 200).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework import hookimpl
from framework.errors import ConfigError


@dataclass
class ColorLoss:
    channel: int = 2
    target: float = 0.9
    scale: float = 200.0
    every: int = 5

    def __post_init__(self) -> None:
        if self.channel not in (0, 1, 2):
            raise ConfigError(f"color_loss.channel must be 0 (red), 1 (green) or 2 (blue), got {self.channel}")
        if self.every < 1:
            raise ConfigError(f"color_loss.every must be ≥ 1, got {self.every}")

    @hookimpl
    def configure(self, run):
        if not run.model.has_decoder:
            raise ConfigError("color_loss guides decoded images but this model has no decoder: use an image model (e.g. model=bundled)")
        run.request_grad(self)

    @hookimpl
    def guidance(self, state, pred):
        if state.pred is not None or state.index % self.every:  # first evaluation of every k-th step only
            return pred
        d = pred.denoised.detach().requires_grad_(True)
        images = state.run.model.decode(d, clamp=False)
        per_sample = (images[:, self.channel] - self.target).abs().flatten(1).mean(1)
        (grad,) = torch.autograd.grad(per_sample.sum() * self.scale, d)
        return pred.shifted(-(pred.sigma**2) * grad)
