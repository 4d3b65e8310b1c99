"""DPM-Solver++(2M) SDE (Lu et al. 2022b, §5 SDE variant; k-diffusion ``sample_dpmpp_2m_sde``;
diffusers' DPMSolverMultistepScheduler ``algorithm_type="sde-dpmsolver++"``). With h = λ' − λ
(λ = −log σ) and ηh: x' = (σ'/σ)e^(−ηh)·x − expm1(−h−ηh)·D + c·(D − D_prev)/r
+ σ'·√(−expm1(−2ηh))·s_noise·z, with a = h + ηh, c = (1 − e^(−a))/2 (``midpoint``) or
1 − (1 − e^(−a))/a (``heun``), r = h_prev/h. η = 0 is the deterministic
DPM-Solver++(2M). First step first order; the step to σ = 0 returns D. NFE 1 per step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, SolverType, hookimpl, lam


@dataclass
class DPMPP2MSDE:
    eta: float = 1.0
    s_noise: float = 1.0
    solver_type: SolverType = SolverType.midpoint

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        h = lam(state.sigma_next) - lam(state.sigma)
        eh = self.eta * h
        one_minus = -math.expm1(-h - eh)  # 1 − e^(−h−ηh)
        x = (state.sigma_next / state.sigma) * math.exp(-eh) * pred.x + one_minus * pred.denoised
        if state.history:
            prev = state.history[-1]
            r = (lam(state.sigma) - lam(prev.sigma)) / h
            c = 0.5 * one_minus if self.solver_type == "midpoint" else 1 - one_minus / (h + eh)
            x = x + c * (pred.denoised - prev.direction) / r
        if self.eta > 0:
            x = x + state.noise(state.sigma, state.sigma_next) * (state.sigma_next * math.sqrt(-math.expm1(-2 * eh)) * self.s_noise)
        return x
