"""DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``; Lu et al. 2022b's DPM-Solver++(2S) with the
stochastic (ancestral) sub-steps): stage 1 is an ancestral DPM-Solver++(1) step to the
intermediate σ_s = σ^(1−r)·σ_next^r (λ-fraction r), stage 2 an ancestral step σ → σ_next along
D̃ = (1 − 1/(2r))·D + 1/(2r)·D_s. The two noises are the increments of one Brownian path in σ
over [σ_s, σ] and [σ_next, σ] (coherent within the step, as k-diffusion's Brownian tree draws
them; across steps they are independent, from the per-sample generators). The step to σ = 0 is
Euler onto D. NFE 2 per step (1 on the last)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, ancestral_split, hookimpl


@dataclass
class DPMPPSDE:
    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")
        if not 0 < self.r < 1:
            raise ConfigError(f"solver.r must be in (0, 1), got {self.r}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        sigma, nxt = state.sigma, state.sigma_next
        if nxt == 0:
            return pred.denoised
        s = sigma ** (1 - self.r) * nxt**self.r
        fac = 1 / (2 * self.r)
        z1 = state.noise(sigma, s) if self.eta > 0 else None
        # stage 1: ancestral DPM-Solver++(1) to σ_s
        down, up = ancestral_split(sigma, s, self.eta)
        x_s = pred.denoised + (down / sigma) * (pred.x - pred.denoised)
        if up > 0:
            x_s = x_s + z1 * (self.s_noise * up)
        d_s = denoise(x_s, s).denoised
        # stage 2: ancestral step along the combined denoised estimate
        down, up = ancestral_split(sigma, nxt, self.eta)
        d = (1 - fac) * pred.denoised + fac * d_s
        x = d + (down / sigma) * (pred.x - d)
        if up > 0:
            z2 = state.noise(s, nxt)
            z = (math.sqrt(sigma - s) * z1 + math.sqrt(s - nxt) * z2) / math.sqrt(sigma - nxt)
            x = x + z * (self.s_noise * up)
        return x
