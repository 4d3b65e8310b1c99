"""Beta schedule (Lee et al. 2024, "Beta sampling is all you need"; diffusers' ``use_beta_sigmas``):
σ_i = σ_min + F⁻¹(1 − i/(N−1))·(σ_max − σ_min) with F the Beta(α, β) CDF (α = β = 0.6 puts more
steps at both ends), then 0."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import ConfigError, InitNoise, finish, hookimpl, sigma_range


@dataclass
class Beta:
    alpha: float = 0.6
    beta: float = 0.6
    sigma_min: float | None = None
    sigma_max: float | None = None
    init_noise: InitNoise = InitNoise.sigma

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.beta <= 0:
            raise ConfigError(f"schedule=beta needs alpha, beta > 0, got {self.alpha}, {self.beta}")

    @hookimpl
    def schedule(self, model, steps):
        from scipy.stats import beta as beta_dist

        lo, hi = sigma_range(model, self.sigma_min, self.sigma_max)
        q = 1 - np.linspace(0.0, 1.0, steps) if steps > 1 else np.array([1.0])
        return finish(lo + beta_dist.ppf(q, self.alpha, self.beta) * (hi - lo), True, self.init_noise)
