"""Karras et al. 2022 (EDM), eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, then 0."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import ConfigError, InitNoise, Schedule, hookimpl, init_noise_scale


@dataclass
class Karras:
    rho: float = 7.0
    sigma_min: float | None = None  # default: the model's
    sigma_max: float | None = None  # default: the model's
    init_noise: InitNoise = InitNoise.sigma  # sigma (σ_max, as EDM) or vp (√(1+σ_max²), diffusers' 'leading')

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise ConfigError(f"schedule.rho must be > 0, got {self.rho}")

    @hookimpl
    def schedule(self, model, steps):
        lo = self.sigma_min if self.sigma_min is not None else model.sigma_min
        hi = self.sigma_max if self.sigma_max is not None else model.sigma_max
        if not 0 < lo < hi:
            raise ConfigError(f"needs 0 < sigma_min < sigma_max, got {lo} and {hi}")
        ramp = np.linspace(0.0, 1.0, steps)
        a, b = hi ** (1 / self.rho), lo ** (1 / self.rho)
        sigmas = (a + ramp * (b - a)) ** self.rho
        sigmas[0] = hi  # exact end points (the power of the root is off by an ulp)
        if steps > 1:
            sigmas[-1] = lo
        grid = tuple(float(s) for s in sigmas) + (0.0,)
        return Schedule(grid, None, init_noise_scale(grid[0], self.init_noise))
