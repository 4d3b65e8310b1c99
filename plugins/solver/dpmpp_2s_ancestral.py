"""DPM-Solver++(2S) ancestral (Lu et al. 2022b, Algorithm 1, singlestep second order with r = 1/2;
k-diffusion ``sample_dpmpp_2s_ancestral``): a DPM-Solver++ step of two stages (the second at the
λ-midpoint) to σ_down, then noise of std σ_up (``framework.sigmas.ancestral_split``). When
σ_down = 0 (the last step) it is Euler onto D. η = 0 gives the deterministic DPM-Solver++(2S).
NFE 2 per step (1 on the last)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework import hookimpl
from framework.errors import ConfigError
from framework.sigmas import ancestral_split, geometric_mean
from framework.state import SamplerState


@dataclass
class DPMPP2SAncestral:
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
            x = pred.denoised
        else:
            mid = geometric_mean(state.sigma, down)
            x_mid = pred.denoised + (mid / state.sigma) * (pred.x - pred.denoised)
            d_mid = denoise(x_mid, mid).denoised
            x = d_mid + (down / state.sigma) * (pred.x - d_mid)
        if up > 0:
            x = x + state.noise(state.sigma, state.sigma_next) * (self.s_noise * up)
        return x
