"""Image-match loss guidance: pull the decoded predicted x0 towards a reference image file.

``metric=mse``: mean squared pixel difference; ``metric=perceptual``: an LPIPS-style distance
(channel-normalised feature differences, no learned weights) under the bundled judge's conv layers
(framework.bases.guidance.JudgeFeatures). The reference is resized to the model's pixel size. Applied by
framework.bases.loss_guidance (by default the normalised latent correction
x ← x − scale·σ·ĝ, ĝ the gradient at unit RMS per sample; ``normalize=false``: x ← x − scale·σ²·∇ₓloss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.plugin import Choice, JudgeFeatures, LossGuidance, load_image, perceptual_distance, pixel_size


class Metric(Choice):
    mse = "mse"
    perceptual = "perceptual"


@dataclass
class ImageMatch(LossGuidance):
    input_files: ClassVar[tuple[str, ...]] = ("image",)  # read by content into the run key
    image: str = ""
    metric: Metric = Metric.mse
    scale: float = 0.2
    normalize: bool = True
    every: int = 2

    def setup(self, run) -> _Reference:
        ref = load_image(self.image, pixel_size(run.model), "guidance.image_match.image").to(run.device, run.dtype)
        if self.metric == "mse":
            return _Reference(ref)
        net = JudgeFeatures().to(run.device, run.dtype)
        with torch.no_grad():
            return _Reference(ref, net, net(ref))

    def loss(self, images, context: _Reference):
        if self.metric == "mse":
            return (images - context.image).pow(2).flatten(1).mean(1)
        ref = [f.expand(images.shape[0], -1, -1, -1) for f in context.features]
        return perceptual_distance(context.net(images), ref)


@dataclass
class _Reference:
    """The reference image of one run and, for the perceptual metric, the feature net and its features."""

    image: torch.Tensor
    net: JudgeFeatures | None = None
    features: list[torch.Tensor] | None = None
