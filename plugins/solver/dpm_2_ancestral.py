"""DPM-Solver-2 ancestral (k-diffusion ``sample_dpm_2_ancestral``; diffusers'
KDPM2AncestralDiscreteScheduler): the DPM-Solver-2 step (Lu et al. 2022, r = 1/2) to σ_down, then
noise of std σ_up (``framework.sigmas.ancestral_split``, σ_down² + σ_up² = σ_next²). When
σ_down = 0 (the last step) the step is Euler onto D. NFE 2 per step (1 on the last)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework import hookimpl
from framework.errors import ConfigError
from framework.sigmas import ancestral_split, geometric_mean
from framework.state import SamplerState


@dataclass
class DPM2Ancestral:
    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        down, up = ancestral_split(state.sigma, state.sigma_next, self.eta)
        if down == 0:
            x = pred.x - state.sigma * pred.derivative
        else:
            mid = geometric_mean(state.sigma, down)
            x_mid = pred.x + (mid - state.sigma) * pred.derivative
            x = pred.x + (down - state.sigma) * denoise(x_mid, mid).derivative
        if up > 0:
            x = x + state.noise(state.sigma, state.sigma_next) * (self.s_noise * up)
        return x
