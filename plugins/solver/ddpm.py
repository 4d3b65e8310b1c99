"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; diffusers' DDPMScheduler with
``variance_type="fixed_small"``): x_prev ~ q(x_prev | x_t, x̂0), the Gaussian posterior with mean
(√ᾱ_prev·β_t·x̂0 + √α_t·(1 − ᾱ_prev)·x_t)/(1 − ᾱ_t) and variance β̃_t = (1 − ᾱ_prev)/(1 − ᾱ_t)·β_t,
where ᾱ = 1/(1 + σ²) and α_t = ᾱ_t/ᾱ_prev. Evaluated in the variance-preserving frame and mapped
back to σ-space; mathematically it equals ``euler_ancestral`` (η = 1). The step to σ = 0 returns x̂0
(no noise). NFE 1 per step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import SamplerState, hookimpl


@dataclass
class DDPM:
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        abar, abar_prev = 1 / (1 + state.sigma**2), 1 / (1 + state.sigma_next**2)
        alpha = abar / abar_prev
        beta = 1 - alpha
        x_vp = pred.x * math.sqrt(abar)
        c0 = math.sqrt(abar_prev) * beta / (1 - abar)
        ct = math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
        std = math.sqrt(max((1 - abar_prev) / (1 - abar) * beta, 1e-20))
        prev = c0 * pred.denoised + ct * x_vp + std * state.noise(state.sigma, state.sigma_next)
        return prev / math.sqrt(abar_prev)
