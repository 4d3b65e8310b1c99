"""Polyexponential schedule (k-diffusion ``get_sigmas_polyexponential``): log σ interpolated between
log σ_max and log σ_min along the ramp r_i = (1 − i/(N−1))^ρ; ρ = 1 is the exponential schedule,
ρ > 1 spends more steps at low noise. Then 0."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import ConfigError, InitNoise, finish, hookimpl, sigma_range


@dataclass
class PolyExponential:
    rho: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    init_noise: InitNoise = InitNoise.sigma

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise ConfigError(f"schedule.rho must be > 0, got {self.rho}")

    @hookimpl
    def schedule(self, model, steps):
        lo, hi = sigma_range(model, self.sigma_min, self.sigma_max)
        ramp = np.linspace(1.0, 0.0, steps) ** self.rho if steps > 1 else np.array([1.0])
        return finish(np.exp(ramp * (np.log(hi) - np.log(lo)) + np.log(lo)), True, self.init_noise)
