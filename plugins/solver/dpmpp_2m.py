"""DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2; diffusers' DPMSolverMultistepScheduler with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``): the exponential
integrator in λ = −log σ on the denoised estimate, x' = (σ'/σ)·x − expm1(−h)·D̃ with h = λ' − λ and
D̃ = D + (D − D_prev)/(2r), r = h_prev/h (λ differences between the steps' evaluation points).
The first step and the step to σ = 0 are first order (DDIM; the last lands on D, as diffusers'
``lower_order_final``/``final_sigmas_type="zero"``). NFE 1 per step; order 2."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import SamplerState, hookimpl, lam


@dataclass
class DPMPP2M:
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        h = lam(state.sigma_next) - lam(state.sigma)
        d = pred.denoised
        if state.history:
            prev = state.history[-1]
            r = (lam(state.sigma) - lam(prev.sigma)) / h
            d = d + (d - prev.direction) / (2 * r)
        return (state.sigma_next / state.sigma) * pred.x - math.expm1(-h) * d
