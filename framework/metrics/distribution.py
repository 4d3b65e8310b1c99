"""Real-vs-generated distribution metrics (FID, KID) as run plugins: generated images stream in at
``batch_end``; the real side is fresh scenes of the bundled world (seeded, ``reference`` of them);
the score is computed at ``run_end`` with torchmetrics on the bundled CLIP's image features."""
from __future__ import annotations

from typing import Any

import torch

from framework import hookimpl
from framework.errors import ConfigError


class RealVsGenerated:
    """Base of the fid/kid plugins: subclasses give ``name`` and ``make_metric(features, n)``."""

    name = ""
    reference: int = 256
    reference_seed: int = 1234

    def make_metric(self, features: torch.nn.Module, n_generated: int) -> Any:
        raise NotImplementedError

    @hookimpl
    def configure(self, run):
        if not run.model.has_decoder:
            raise ConfigError(f"{self.name} compares images but this model has no decoder: use an image model")
        if run.settings.num_samples < 2 or self.reference < 2:
            raise ConfigError(f"{self.name} needs at least 2 generated and 2 real images: raise num_samples")
        from framework.metrics.clip_features import BundledCLIPFeatures
        from framework.bundled.world import sample_scenes

        self._metric = self.make_metric(BundledCLIPFeatures(), run.settings.num_samples)
        real = sample_scenes(self.reference, seed=self.reference_seed).images
        for chunk in real.split(64):
            self._metric.update((chunk + 1) / 2, real=True)

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        self._metric.update(images.float().cpu(), real=False)

    @hookimpl
    def run_end(self, run, result):
        value = self._metric.compute()
        if isinstance(value, tuple):  # KID: (mean, std)
            run.metrics[self.name], run.metrics[f"{self.name}_std"] = float(value[0]), float(value[1])
        else:
            run.metrics[self.name] = float(value)
