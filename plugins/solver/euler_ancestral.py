"""Euler ancestral (k-diffusion ``sample_euler_ancestral``; Song et al. 2021, DDPM/DDIM-η in σ-space):
an Euler step of the probability-flow ODE to σ_down, then fresh noise of std σ_up with
σ_down² + σ_up² = σ_next² (``framework.maths.sigmas.ancestral_split``). The step to σ = 0 adds no
noise (it lands on D). η = 0 is Euler; NFE 1 per step; weak order 1, strong order 1/2."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import Ancestral, SamplerState, hookimpl


@dataclass
class EulerAncestral(Ancestral):
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        down, up = self.split(state)
        x = pred.x + (down - state.sigma) * pred.derivative
        return self.renoise(state, x, up)
