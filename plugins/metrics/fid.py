"""Fréchet distance (Heusel et al. 2017; torchmetrics FrechetInceptionDistance) between generated
images and fresh real scenes of the bundled world, on the bundled CLIP's 64-d image features
(Inception features are not available offline)."""
from __future__ import annotations

from dataclasses import dataclass

from torchmetrics.image.fid import FrechetInceptionDistance

from framework.metrics.distribution import RealVsGenerated


@dataclass
class FID(RealVsGenerated):
    reference: int = 256
    reference_seed: int = 1234
    name = "fid"

    def make_metric(self, features, n_generated):
        return FrechetInceptionDistance(feature=features, normalize=True, input_img_size=(3, 64, 64))
