"""SEEDS, Stochastic Explicit Exponential Derivative-free Solvers (Gonzalez et al. 2023, NeurIPS,
arXiv:2305.14267), data prediction, as ComfyUI's ``sample_seeds_2`` / ``sample_seeds_3`` run them in
σ-space. λ = −log σ, h = λ' − λ, H = (1 + η)·h, a stage at λ + r·h has σ_r = σ·e^(−rh):

SEEDS-2 (``Seeds2``): x₂ = (σ_r/σ)e^(−rhη)·x + rH·φ₁(−rH)·D + σ_r·s_noise·n₁, D₂ = D(x₂, σ_r);
    ``phi_1``: x' = (σ'/σ)e^(−hη)·x + H·φ₁(−H)·(D + (D₂ − D)/(2r)) + σ'·s_noise·n
    ``phi_2``: x' = (σ'/σ)e^(−hη)·x + H·((φ₁(−H) − φ₂(−H)/r)·D + φ₂(−H)/r·D₂) + σ'·s_noise·n
SEEDS-3 (``Seeds3``, r₁ < r₂): x₂ as above at r₁; x₃ = (σ_{r₂}/σ)e^(−r₂hη)·x + r₂H·(φ₁(−r₂H)·D
    + (r₂/r₁)·φ₂(−r₂H)·(D₂ − D)) + σ_{r₂}·s_noise·n₂, D₃ = D(x₃, σ_{r₂});
    x' = (σ'/σ)e^(−hη)·x + H·(φ₁(−H)·D + φ₂(−H)/r₂·(D₃ − D)) + σ'·s_noise·n.

The noises n₁, n₂, n are the standardised SDE noise over [λ, λ + r₁h], [λ, λ + r₂h], [λ, λ'] of one
Brownian path (each stage continues the previous one with a fresh increment:
``framework.maths.sde.ou_extend``), drawn with ``state.noise(σ_a, σ_b)`` per sub-interval. η = 0 is
deterministic: SEEDS-2 ``phi_1`` with r = 1/2 is DPM-Solver++(2S) (order 2), ``phi_2`` the
exponential Runge–Kutta pair of order 2, SEEDS-3 DPM-Solver-3's data-prediction form (order 3).
ComfyUI's ``exp_heun_2_x0`` / ``exp_heun_2_x0_sde`` are SEEDS-2 with r = 1 and ``phi_2`` (the
exponential Heun method in x₀ and λ) at η = 0 / η = 1: conf/solver/exp_heun_2_x0*.yaml.
The step to σ = 0 returns D (1 NFE); otherwise 2 (SEEDS-2) or 3 (SEEDS-3) NFE per step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import Choice, ConfigError, SamplerState, hookimpl, lam, noise_factor, ou_extend, phi


class Stage2Form(Choice):
    """SEEDS-2's last stage: D and D₂ blended under φ₁ (``phi_1``) or weighted with φ₂ (``phi_2``)."""

    phi_1 = "phi_1"
    phi_2 = "phi_2"


def _check(eta: float, s_noise: float) -> None:
    if eta < 0 or s_noise < 0:
        raise ConfigError(f"solver.eta and solver.s_noise must be ≥ 0, got {eta} and {s_noise}")


class _Seeds:
    eta: float
    s_noise: float

    @property
    def stochastic(self) -> bool:
        return self.eta > 0 and self.s_noise > 0

    def first_stage(self, state: SamplerState, h: float, r: float, x: torch.Tensor, d: torch.Tensor):
        """(x at λ + r·h, its σ, the standardised noise n over [λ, λ + r·h] or None)."""
        sig_r = state.sigma_next if r == 1 else state.sigma * math.exp(-r * h)
        big = r * h * (1 + self.eta)
        x_r = (sig_r / state.sigma) * math.exp(-r * h * self.eta) * x + big * phi(1, -big) * d
        if not self.stochastic:
            return x_r, sig_r, None
        n = state.noise(state.sigma, sig_r) * noise_factor(r * h * self.eta)
        return x_r + n * (sig_r * self.s_noise), sig_r, n

    def finish(self, state: SamplerState, x: torch.Tensor, n, sig_a: float, r: float, h: float) -> torch.Tensor:
        """Add σ'·s_noise·n, n the noise over [λ, λ'] continued from ``n`` over [λ, λ + r·h]."""
        if n is None:
            return x
        if r < 1:
            n = ou_extend(n, state.noise(sig_a, state.sigma_next), (1 - r) * h * self.eta)
        return x + n * (state.sigma_next * self.s_noise)

    def step_from_infinity(self, state: SamplerState) -> torch.Tensor:
        """From σ = ∞ (the state is the unit noise ε) only the first-order step has a limit:
        x' = D + σ'·ε at η = 0, D + σ'·s_noise·z otherwise (e^(−ηh) → 0, √(1 − e^(−2ηh)) → 1)."""
        d, t = state.pred.denoised, state.sigma_next
        if not self.stochastic:
            return d + t * state.pred.x
        return d + state.noise() * (t * self.s_noise)


@dataclass
class Seeds2(_Seeds):
    eta: float = 1.0
    s_noise: float = 1.0
    r: float = 0.5
    solver_type: Stage2Form = Stage2Form.phi_1

    def __post_init__(self) -> None:
        _check(self.eta, self.s_noise)
        if not 0 < self.r <= 1:
            raise ConfigError(f"solver.r must be in (0, 1], got {self.r}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        d = pred.denoised
        if state.sigma_next == 0:
            return d
        h = lam(state.sigma_next) - lam(state.sigma)
        x2, sig_r, n = self.first_stage(state, h, self.r, pred.x, d)
        d2 = denoise(x2, sig_r).denoised
        big = h * (1 + self.eta)
        lin = (state.sigma_next / state.sigma) * math.exp(-h * self.eta) * pred.x
        if self.solver_type == "phi_1":
            x = lin + big * phi(1, -big) * (d + (d2 - d) / (2 * self.r))
        else:
            b2 = phi(2, -big) / self.r
            x = lin + big * ((phi(1, -big) - b2) * d + b2 * d2)
        return self.finish(state, x, n, sig_r, self.r, h)


@dataclass
class Seeds3(_Seeds):
    eta: float = 1.0
    s_noise: float = 1.0
    r_1: float = 1 / 3
    r_2: float = 2 / 3

    def __post_init__(self) -> None:
        _check(self.eta, self.s_noise)
        if not 0 < self.r_1 < self.r_2 <= 1:
            raise ConfigError(f"solver=seeds_3 needs 0 < r_1 < r_2 ≤ 1, got r_1={self.r_1}, r_2={self.r_2}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        d = pred.denoised
        if state.sigma_next == 0:
            return d
        s, r1, r2, eta = state.sigma, self.r_1, self.r_2, self.eta
        h = lam(state.sigma_next) - lam(s)
        x2, sig1, n = self.first_stage(state, h, r1, pred.x, d)
        d2 = denoise(x2, sig1).denoised
        sig2 = s * math.exp(-r2 * h)
        big2 = r2 * h * (1 + eta)
        x3 = (sig2 / s) * math.exp(-r2 * h * eta) * pred.x + big2 * (
            phi(1, -big2) * d + (r2 / r1) * phi(2, -big2) * (d2 - d))
        if n is not None:
            n = ou_extend(n, state.noise(sig1, sig2), (r2 - r1) * h * eta)
            x3 = x3 + n * (sig2 * self.s_noise)
        d3 = denoise(x3, sig2).denoised
        big = h * (1 + eta)
        x = (state.sigma_next / s) * math.exp(-h * eta) * pred.x + big * (
            phi(1, -big) * d + phi(2, -big) / r2 * (d3 - d))
        return self.finish(state, x, n, sig2, r2, h)
