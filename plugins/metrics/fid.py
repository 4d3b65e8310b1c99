"""Fréchet distance (Heusel et al. 2017; torchmetrics FrechetInceptionDistance) between generated
images and a reference set (fresh scenes of the bundled world, or ``reference_dir``), on the
configured features: the bundled CLIP's 64-d image embedding (default), ``inception`` (optional
extra) or any extractor by import path. Reference features are cached on disk, keyed by data and
features."""
from __future__ import annotations

from dataclasses import dataclass

from torchmetrics.image.fid import FrechetInceptionDistance

from framework.plugin import RealVsGenerated


@dataclass
class FID(RealVsGenerated):
    name = "fid"

    def make_metric(self, features, n_generated, n_real):
        return FrechetInceptionDistance(feature=features, normalize=True, input_img_size=(3, 64, 64))
