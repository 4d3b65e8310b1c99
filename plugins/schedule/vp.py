"""VP schedule (Song et al. 2021, the variance-preserving SDE; k-diffusion ``get_sigmas_vp``):
uniform time t from 1 to ε_s with σ(t) = √(exp(β_d·t²/2 + β_min·t) − 1), then 0."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import ConfigError, InitNoise, finish, hookimpl


@dataclass
class VP:
    beta_d: float = 19.9
    beta_min: float = 0.1
    eps_s: float = 1e-3
    init_noise: InitNoise = InitNoise.sigma

    def __post_init__(self) -> None:
        if not 0 < self.eps_s < 1 or self.beta_d <= 0 or self.beta_min < 0:
            raise ConfigError("schedule=vp needs 0 < eps_s < 1, beta_d > 0, beta_min ≥ 0")

    @hookimpl
    def schedule(self, model, steps):
        t = np.linspace(1.0, self.eps_s, steps) if steps > 1 else np.array([1.0])
        return finish(np.sqrt(np.expm1(self.beta_d * t**2 / 2 + self.beta_min * t)), True, self.init_noise)
