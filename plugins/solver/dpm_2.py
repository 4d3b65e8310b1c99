"""DPM-Solver-2 in σ-space (Lu et al. 2022, Algorithm 1 with r = 1/2; Karras et al. 2022's
``sample_dpm_2``; diffusers' KDPM2DiscreteScheduler): the derivative at the log-σ midpoint
σ_mid = √(σ·σ_next), reached by an Euler step, drives the whole step. Order 2, NFE 2 per step;
the last step to σ = 0 is Euler (no evaluation at σ = 0), so N steps cost 2N − 1 evaluations."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import SamplerState, geometric_mean, hookimpl


@dataclass
class DPM2:
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.x - state.sigma * pred.derivative
        mid = geometric_mean(state.sigma, state.sigma_next)
        x_mid = pred.x + (mid - state.sigma) * pred.derivative
        d_mid = denoise(x_mid, mid).derivative
        return pred.x + (state.sigma_next - state.sigma) * d_mid
