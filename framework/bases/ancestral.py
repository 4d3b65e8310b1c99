"""What ancestral solvers share: η and s_noise, and the noise added after the deterministic part.

An ancestral step σ → σ' takes a deterministic step to σ_down and adds fresh noise of std
s_noise·σ_up (``framework.maths.sigmas.ancestral_split``; η = 0 is the ODE, η = 1 the DDPM posterior).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from framework.core.errors import ConfigError
from framework.maths.sigmas import ancestral_split

if TYPE_CHECKING:
    from framework.core.step import SamplerState


@dataclass
class Ancestral:
    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")

    def split(self, state: SamplerState) -> tuple[float, float]:
        """(σ_down, σ_up) of this step."""
        return ancestral_split(state.sigma, state.sigma_next, self.eta)

    def step_from_infinity(self, state: SamplerState) -> torch.Tensor:
        """The ancestral step's limit from σ = ∞, where the state is the unit noise ε: σ_up →
        min(η, 1)·σ₁ and σ_down = √(σ₁² − σ_up²), so x₁ = D + σ_down·ε + s_noise·σ_up·z."""
        up = min(self.eta, 1.0) * state.sigma_next
        x = state.pred.denoised + math.sqrt(state.sigma_next**2 - up**2) * state.pred.x
        return x + state.noise() * (self.s_noise * up) if up > 0 else x

    def renoise(self, state: SamplerState, x: torch.Tensor, up: float) -> torch.Tensor:
        """x plus noise of std s_noise·σ_up for this step's interval (none when σ_up = 0)."""
        return x + state.noise(state.sigma, state.sigma_next) * (self.s_noise * up) if up > 0 else x
