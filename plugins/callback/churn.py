"""Stochastic churn (Karras et al. 2022, "EDM", Algorithm 2, lines 4–6), as a before-step plugin
that works with any solver: for σ_i in [s_tmin, s_tmax], raise the noise level to
σ̂ = σ_i·(1 + γ), γ = min(s_churn/N, √2 − 1), by adding fresh noise of std √(σ̂² − σ_i²)·s_noise;
the solver then steps from (x̂, σ̂) to σ_{i+1}. s_churn = 0 is a no-op. Noise comes from the
per-sample generators. On discrete models σ̂ carries no grid timestep (the adapter interpolates)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.plugin import ConfigError, SamplerState, hookimpl


@dataclass
class Churn:
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.s_churn < 0 or self.s_noise < 0:
            raise ConfigError("callback.churn needs s_churn ≥ 0 and s_noise ≥ 0")
        if self.s_tmin > self.s_tmax:
            raise ConfigError(f"callback.churn needs s_tmin ≤ s_tmax, got {self.s_tmin} > {self.s_tmax}")

    def gamma(self, sigma: float, steps: int) -> float:
        """γ_i of EDM's Algorithm 2 for a step starting at σ."""
        if self.s_churn == 0 or not self.s_tmin <= sigma <= self.s_tmax:
            return 0.0
        return min(self.s_churn / steps, math.sqrt(2.0) - 1.0)

    @hookimpl
    def before_step(self, state: SamplerState) -> None:
        gamma = self.gamma(state.sigma, state.schedule.steps)
        if gamma == 0 or state.sigma == 0:
            return
        sigma_hat = state.sigma * (1 + gamma)
        state.x = state.x + state.noise() * (self.s_noise * math.sqrt(sigma_hat**2 - state.sigma**2))
        state.sigma = sigma_hat
