"""Kernel distance (Bińkowski et al. 2018; torchmetrics KernelInceptionDistance, polynomial
kernel) between generated images and a reference set, on the configured features (see ``fid``);
subsets of min(``subset_size``, samples, reference) images. Reports ``kid`` and ``kid_std``."""
from __future__ import annotations

from dataclasses import dataclass

from torchmetrics.image.kid import KernelInceptionDistance

from framework.plugin import RealVsGenerated


@dataclass
class KID(RealVsGenerated):
    subset_size: int = 100
    subsets: int = 50
    name = "kid"

    def make_metric(self, features, n_generated, n_real):
        size = min(self.subset_size, n_generated, n_real)
        return KernelInceptionDistance(feature=features, normalize=True, subset_size=size, subsets=self.subsets)
