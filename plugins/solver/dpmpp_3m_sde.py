"""DPM-Solver++(3M) SDE (Lu et al. 2022b, third-order multistep; k-diffusion
``sample_dpmpp_3m_sde``; with η = 0 it is diffusers' DPMSolverMultistepScheduler ``dpmsolver++``
with ``solver_order=3``). With h = λ' − λ (λ = −log σ) and a = (1 + η)·h:

    x' = (σ'/σ)·e^(−ηh)·x + (1 − e^(−a))·D + φ₂·D₁ − φ₃·D₂ + σ'·√(1 − e^(−2ηh))·s_noise·z,

φ₂ = 1 − (1 − e^(−a))/a, φ₃ = φ₂/a − 1/2; D₁, D₂ are the first and second divided differences of
the last three denoised estimates in λ (scaled by h, h²).

Measured order (docs/solvers.md): the published multistep update (DPM-Solver's code, diffusers,
k-diffusion; kept as the default for parity) is second order: D₂ ≈ h²·D''/2 while the Taylor term
of the exponential integral is −φ₃·h²·D'', so its D'' term is half the exact one.
``taylor_d2=true`` weights D₂ by 2·φ₃ and gives the third order (η = 0).

Warm-up: first order, then second (``solver_type``: k-diffusion's φ₂ form ``heun`` or diffusers'
``midpoint``). A step to σ = 0 returns D; ``lower_order_final`` (diffusers) makes the
second-to-last step of a grid of < 15 steps second order. NFE 1 per step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, SolverType, hookimpl, lam, multistep_order


def _phis(a: float) -> tuple[float, float]:
    """φ₂ = (e^(−a) − 1)/a + 1 and φ₃ = φ₂/a − 1/2: the weights of the first and second divided
    differences in the exponential integrator over a step of length a in λ."""
    phi2 = math.expm1(-a) / a + 1
    return phi2, phi2 / a - 0.5


@dataclass
class DPMPP3MSDE:
    eta: float = 1.0
    s_noise: float = 1.0
    lower_order_final: bool = True
    taylor_d2: bool = False  # true: weight D₂ by 2φ₃ (order 3); false: as published (order 2)
    solver_type: SolverType = SolverType.heun  # second-order warm-up: heun (φ₂·D₁, k-diffusion), midpoint (D₁/2)

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        p = multistep_order(3, len(state.history), state.index, state.schedule.steps, False, self.lower_order_final)
        h = lam(state.sigma_next) - lam(state.sigma)
        a = (1 + self.eta) * h
        d0 = pred.denoised
        x = (state.sigma_next / state.sigma) * math.exp(-self.eta * h) * pred.x - math.expm1(-a) * d0
        phi2, phi3 = _phis(a)
        if self.taylor_d2:
            phi3 = 2 * phi3
        hist = state.history
        if p >= 2:
            l0, l1 = lam(state.sigma), lam(hist[-1].sigma)
            r0 = (l0 - l1) / h
            d1_0 = (d0 - hist[-1].direction) / r0
            if p == 2:
                x = x + (phi2 if self.solver_type == "heun" else -0.5 * math.expm1(-a)) * d1_0
            else:
                r1 = (l1 - lam(hist[-2].sigma)) / h
                d1_1 = (hist[-1].direction - hist[-2].direction) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi2 * d1 - phi3 * d2
        if self.eta > 0:
            x = x + state.noise(state.sigma, state.sigma_next) * (state.sigma_next * math.sqrt(-math.expm1(-2 * self.eta * h)) * self.s_noise)
        return x
