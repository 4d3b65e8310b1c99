"""PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, eq. 12, with the PRK warm-up
replaced by one Heun step as in diffusers' PNDMScheduler ``skip_prk_steps=True``). In σ-space the
DDIM transfer φ is the Euler step x' = x + (σ' − σ)·ε, so PLMS is the fixed-coefficient
Adams–Bashforth method on ε = (x − D)/σ: step 0 is Heun (2 NFE, ε averaged between the two
evaluations; the second one is not kept in the history), step i ≥ 1 uses AB_k with
k = min(i + 1, 4) over the first evaluations of the last k steps (1 NFE). Coefficients assume a
uniform grid (as PNDM does), so on strongly non-uniform grids the order is reduced. A step to
σ = 0 needs no evaluation there (the Heun warm-up falls back to Euler)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import SamplerState, fixed_adams_bashforth, hookimpl



@dataclass
class PLMS:
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        dt = state.sigma_next - state.sigma
        if not state.is_first:
            return fixed_adams_bashforth(state, 4)
        x_euler = pred.x + dt * pred.derivative
        if state.sigma_next == 0:
            return x_euler
        eps_next = denoise(x_euler, state.sigma_next).derivative
        return pred.x + dt * (pred.derivative + eps_next) / 2
