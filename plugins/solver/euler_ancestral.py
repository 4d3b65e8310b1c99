"""Euler ancestral (k-diffusion ``sample_euler_ancestral``; Song et al. 2021, DDPM/DDIM-η in σ-space):
an Euler step of the probability-flow ODE to σ_down, then fresh noise of std σ_up with
σ_down² + σ_up² = σ_next² (``framework.sigmas.ancestral_split``). The step to σ = 0 adds no
noise (it lands on D). η = 0 is Euler; NFE 1 per step; weak order 1, strong order 1/2."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework import hookimpl
from framework.errors import ConfigError
from framework.sigmas import ancestral_split
from framework.state import SamplerState


@dataclass
class EulerAncestral:
    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        down, up = ancestral_split(state.sigma, state.sigma_next, self.eta)
        x = pred.x + (down - state.sigma) * pred.derivative
        if up > 0:
            x = x + state.noise(state.sigma, state.sigma_next) * (self.s_noise * up)
        return x
