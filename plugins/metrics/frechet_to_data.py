"""Fréchet distance of the generated samples to the true data distribution, for analytic models
(``model=gaussian``, ``model=mixture``, or any denoiser with ``data_moments()`` or
``sample_data(n, generator)``): the
squared 2-Wasserstein distance between Gaussian fits (Heusel et al. 2017's FID formula, here in the
data space itself). The true side uses the exact moments where they are known in closed form —
Gaussian N(m, s²I); mixture mean Σwₖμₖ and covariance Σwₖ(sₖ²I + μₖμₖᵀ) − μμᵀ — and ``reference``
samples drawn from ``sample_data`` otherwise. Reports ``frechet_to_data``. With N generated samples
in D dimensions the estimate carries a positive finite-sample bias of order D²/N even for exact
samples: compare runs at equal ``num_samples``. The engine's ``rmse_to_reference`` (error to the
exact ODE solution from the same noise) complements it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, frechet_distance, hookimpl, moments


def true_moments(denoiser: object, reference: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of an analytic denoiser's data distribution, flattened: exact when the
    denoiser knows them (``data_moments()``), else estimated from ``reference`` samples."""
    exact = getattr(denoiser, "data_moments", None)
    if exact is not None:
        return exact()
    sample = getattr(denoiser, "sample_data", None)
    if sample is None:
        raise ConfigError("frechet_to_data needs an analytic model (model=gaussian or model=mixture) or a denoiser with "
                          "data_moments() or sample_data(n, generator)")
    return moments(sample(reference, generator=torch.Generator().manual_seed(seed)))


@dataclass
class FrechetToData:
    reference: int = 10000  # true samples drawn when the moments are not known in closed form
    reference_seed: int = 1234

    def true(self, run) -> tuple[torch.Tensor, torch.Tensor]:
        """The data distribution's (mean, covariance), made once per run (in the run's stash)."""
        return run.stash.get(self, lambda: true_moments(run.model.denoiser, self.reference, self.reference_seed))

    @hookimpl
    def configure(self, run):
        denoiser = getattr(run.model, "denoiser", None)
        if run.model.has_decoder or denoiser is None:
            raise ConfigError("frechet_to_data compares with the true data distribution of an analytic model: "
                              "use model=gaussian or model=mixture (image models: metrics=[fid])")
        if run.settings.num_samples < 2:
            raise ConfigError("frechet_to_data needs at least 2 samples: raise num_samples")
        self.true(run)

    @hookimpl
    def run_end(self, run, result):
        mean, cov = moments(result.latents.detach().cpu())
        run.metrics["frechet_to_data"] = frechet_distance(mean, cov, *self.true(run))
