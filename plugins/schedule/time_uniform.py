"""Time-uniform schedule (DPM-Solver's ``time_uniform``/``time_quadratic`` skip types, Lu et al.
2022; ComfyUI's ``normal`` and ``sgm_uniform``): model times spaced uniformly in t^(1/ρ) from the
highest to the lowest, τ_i = (t_max^(1/ρ) + w_i·(t_min^(1/ρ) − t_max^(1/ρ)))^ρ, then σ = 0.

Discrete models: t is the training timestep (0 … T−1), σ(τ) by log-σ interpolation between training
steps (``framework.maths.sigmas.sigma_at_time``) and the grid carries τ as the model time. Continuous
models use EDM's time t = σ, where this is the Karras schedule with the same ρ. ``endpoint=false``
spaces N + 1 points and drops the last (SGM's "uniform" grid, ComfyUI ``sgm_uniform``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import ConfigError, InitNoise, Schedule, hookimpl, init_noise_scale, sigma_at_time


@dataclass
class TimeUniform:
    rho: float = 1.0
    endpoint: bool = True
    init_noise: InitNoise = InitNoise.sigma

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise ConfigError(f"schedule.rho must be > 0, got {self.rho}")

    @hookimpl
    def schedule(self, model, steps):
        train = getattr(model, "train_sigmas", None)
        if train is not None:
            train = np.asarray(train, dtype=np.float64)
            t_lo, t_hi = 0.0, float(len(train) - 1)
        else:
            t_lo, t_hi = float(model.sigma_min), float(model.sigma_max)
        w = np.linspace(0.0, 1.0, steps) if self.endpoint else np.linspace(0.0, 1.0, steps + 1)[:-1]
        if steps == 1 and self.endpoint:
            w = np.array([0.0])
        a, b = t_hi ** (1 / self.rho), t_lo ** (1 / self.rho)
        times = [float(t) for t in (a + w * (b - a)) ** self.rho]
        if train is None:
            sigmas, timesteps = times + [0.0], None
        else:
            sigmas = [sigma_at_time(t, train) for t in times] + [0.0]
            timesteps = tuple(times) + (None,)
        return Schedule(tuple(sigmas), timesteps, init_noise_scale(sigmas[0], self.init_noise))
