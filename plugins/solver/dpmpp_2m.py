"""DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2; diffusers' DPMSolverMultistepScheduler with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``): the exponential
integrator in λ = −log σ on the denoised estimate, x' = (σ'/σ)·x − expm1(−h)·D̃ with h = λ' − λ and
D̃ = D + (D − D_prev)/(2r), r = h_prev/h (λ differences between the steps' evaluation points).
The first step and the step to σ = 0 are first order (DDIM; the last lands on D, as diffusers'
``lower_order_final``/``final_sigmas_type="zero"``). NFE 1 per step; order 2."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.plugin import SamplerState, hookimpl, scalar


@dataclass
class DPMPP2M:
    capturable: ClassVar[bool] = True  # compile=step: tensor arithmetic of σ (framework.maths.scalar)

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.to_zero:
            return pred.denoised
        h = scalar.log(state.sigma) - scalar.log(state.sigma_next)  # λ' − λ, λ = −log σ
        d = pred.denoised
        if state.history:
            prev = state.history[-1]
            r = (scalar.log(prev.sigma) - scalar.log(state.sigma)) / h
            d = d + (d - prev.direction) / (2 * r)
        return (state.sigma_next / state.sigma) * pred.x - scalar.expm1(-h) * d
