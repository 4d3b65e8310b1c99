"""Real-vs-generated distribution metrics (FID, KID) as run plugins: generated images stream in at
``batch_end``; the real side is a reference set (fresh scenes of the bundled world, seeded, or a
folder of images) whose features are computed once and cached on disk
(:mod:`framework.metrics.reference`); the score is computed at ``run_end`` with torchmetrics on the
configured features (:mod:`framework.metrics.features`: the bundled CLIP's image tower by default).

Throughput (issue 26): the extractor is loaded once per process and runs on the run's device; a
batch's features are computed once, on the run's background worker (:mod:`framework.core.background`),
and shared by every metric on the same features (FID and KID); the torchmetrics object receives
them through a pass-through module (``Precomputed``), so its states are what its own ``update``
would have made from the images."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from framework.core.background import background, drain
from framework.core.markers import hookimpl
from framework.core.errors import ConfigError


class Precomputed(torch.nn.Module):
    """The "extractor" handed to torchmetrics: features in, the same features out."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class RealVsGenerated:
    """Base of the fid/kid plugins: subclasses give ``name`` and ``make_metric(features, n)``."""

    input_files: ClassVar[tuple[str, ...]] = ("reference_dir", "inception_weights")  # by content, into the run key
    reference: int = 256
    reference_seed: int = 1234
    reference_dir: str | None = None
    features: str = "clip"
    inception_weights: str | None = None
    cache_dir: str | None = None
    use_cache: bool = True
    name = ""

    def make_metric(self, features: torch.nn.Module, n_generated: int) -> Any:
        raise NotImplementedError

    @hookimpl
    def configure(self, run):
        from framework.metrics.features import load_features
        from framework.metrics.reference import ReferenceSet, add_real_features, reference_features

        if not run.model.has_decoder:
            raise ConfigError(f"{self.name} compares images but this model has no decoder: use an image model")
        if run.settings.num_samples < 2 or (self.reference_dir is None and self.reference < 2):
            raise ConfigError(f"{self.name} needs at least 2 generated and 2 real images: raise num_samples")
        extractor = load_features(self.features, self.inception_weights).cpu()  # reference features: on the CPU as ever
        ref = ReferenceSet(self.reference, self.reference_seed, self.reference_dir)
        real, _ = reference_features(extractor, self.features, ref, self.cache_dir, self.use_cache)
        metric = self.make_metric(Precomputed(extractor.num_features), run.settings.num_samples, real.shape[0])
        add_real_features(metric, real)
        run.stash.get(self, lambda: (metric.to(run.device), extractor.to(run.device)))

    def metric(self, run) -> Any:
        """This run's torchmetrics object (its real features were added in ``configure``)."""
        return run.stash.get(self, lambda: (None, None))[0]

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        metric, extractor = run.stash.get(self, lambda: (None, None))
        background(run).submit(self._update, batch, images, metric, extractor)

    @staticmethod
    def _update(batch, images, metric, extractor) -> None:
        # one extraction per batch and extractor (FID and KID on the same features share it)
        features = batch.stash.get(extractor, lambda: extractor(images.float()), name="features")
        metric.update(features, real=False)

    @hookimpl
    def run_end(self, run, result):
        drain(run)  # every batch's update (a no-op after the run loop's own drain)
        with torch.random.fork_rng(devices=[]):  # KID's random subsets: the same whatever ran before
            torch.manual_seed(self.reference_seed)
            value = self.metric(run).compute()
        if isinstance(value, tuple):  # KID: (mean, std)
            run.metrics[self.name], run.metrics[f"{self.name}_std"] = float(value[0]), float(value[1])
        else:
            run.metrics[self.name] = float(value)
