"""DPM-Solver-2 ancestral (k-diffusion ``sample_dpm_2_ancestral``; diffusers'
KDPM2AncestralDiscreteScheduler): the DPM-Solver-2 step (Lu et al. 2022, r = 1/2) to σ_down, then
noise of std σ_up (``framework.maths.sigmas.ancestral_split``, σ_down² + σ_up² = σ_next²). When
σ_down = 0 (the last step) the step is Euler onto D. NFE 2 per step (1 on the last)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import Ancestral, SamplerState, geometric_mean, hookimpl


@dataclass
class DPM2Ancestral(Ancestral):
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        down, up = self.split(state)
        if down == 0:
            x = pred.x - state.sigma * pred.derivative
        else:
            mid = geometric_mean(state.sigma, down)
            x_mid = pred.x + (mid - state.sigma) * pred.derivative
            x = pred.x + (down - state.sigma) * denoise(x_mid, mid).derivative
        return self.renoise(state, x, up)
