"""DPM-Solver++(2S) ancestral (Lu et al. 2022b, Algorithm 1, singlestep second order with r = 1/2;
k-diffusion ``sample_dpmpp_2s_ancestral``): a DPM-Solver++ step of two stages (the second at the
λ-midpoint) to σ_down, then noise of std σ_up (``framework.maths.sigmas.ancestral_split``). When
σ_down = 0 (the last step) it is Euler onto D. η = 0 gives the deterministic DPM-Solver++(2S).
NFE 2 per step (1 on the last)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import Ancestral, SamplerState, geometric_mean, hookimpl


@dataclass
class DPMPP2SAncestral(Ancestral):
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        down, up = self.split(state)
        if down == 0:
            x = pred.denoised
        else:
            mid = geometric_mean(state.sigma, down)
            x_mid = pred.denoised + (mid / state.sigma) * (pred.x - pred.denoised)
            d_mid = denoise(x_mid, mid).denoised
            x = d_mid + (down / state.sigma) * (pred.x - d_mid)
        return self.renoise(state, x, up)
