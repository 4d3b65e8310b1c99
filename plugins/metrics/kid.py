"""Kernel distance (Bińkowski et al. 2018; torchmetrics KernelInceptionDistance, polynomial
kernel) between generated images and fresh real scenes of the bundled world, on the bundled CLIP's
image features; subsets of min(``subset_size``, samples) images. Reports ``kid`` and ``kid_std``."""
from __future__ import annotations

from dataclasses import dataclass

from torchmetrics.image.kid import KernelInceptionDistance

from framework.metrics.distribution import RealVsGenerated


@dataclass
class KID(RealVsGenerated):
    reference: int = 256
    reference_seed: int = 1234
    subset_size: int = 100
    subsets: int = 50
    name = "kid"

    def make_metric(self, features, n_generated):
        size = min(self.subset_size, n_generated, self.reference)
        return KernelInceptionDistance(feature=features, normalize=True, subset_size=size, subsets=self.subsets)
