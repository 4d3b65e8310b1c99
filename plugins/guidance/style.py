"""Style loss guidance (Gatys et al. 2016, "Image Style Transfer Using Convolutional Neural
Networks"): match the Gram statistics of a reference image's feature maps.

loss = Σ_layers mean‖G_l(image) − G_l(reference)‖² with G_l the channel Gram matrix of layer l,
normalised by C·H·W, under a small frozen CNN: the bundled judge's four conv blocks
(framework.bases.guidance.JudgeFeatures; 32, 16, 8 and 4 px). Gram statistics need convolutional feature
maps: the judge is a CNN trained on this world's colours, shapes and stripes, so its early layers
code colour and texture; the bundled CLIP's vision tower is a 3-layer ViT with 8-px patches (an
8×8 token grid at 64 px) whose tokens mix globally through attention — a poorer texture code.
Applied by framework.bases.loss_guidance with gradient-norm scaling by default (x ← x − scale·σ·ĝ, ĝ the
unit-RMS gradient): the raw gradient of Gram statistics varies by orders of magnitude between references.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.plugin import JudgeFeatures, LossGuidance, gram, load_image, pixel_size


@dataclass
class Style(LossGuidance):
    input_files: ClassVar[tuple[str, ...]] = ("image",)  # read by content into the run key
    image: str = ""
    scale: float = 0.2
    normalize: bool = True
    every: int = 5

    def setup(self, run) -> tuple[JudgeFeatures, list[torch.Tensor]]:
        """(the feature net, the reference image's Gram matrices) for this run."""
        net = JudgeFeatures().to(run.device, run.dtype)
        ref = load_image(self.image, pixel_size(run.model), "guidance.style.image").to(run.device, run.dtype)
        with torch.no_grad():
            return net, [gram(f) for f in net(ref)]

    def loss(self, images, context):
        net, grams = context
        return sum((gram(f) - g).pow(2).flatten(1).mean(1) for f, g in zip(net(images), grams))
