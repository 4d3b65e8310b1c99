"""ER-SDE-Solver (Cui et al. 2023, "Elucidating the Solution Space of Extended Reverse-Time SDEs for
Diffusion Models", arXiv:2309.06169; ComfyUI's ``er_sde``, after the authors' ``er_sde_solver.py``),
in σ-space (the paper's VE form; alpha = 1). With the noise scale function φ(ς) = ς·g(ς) and
r = φ(σ')/φ(σ), a step σ → σ' is the Taylor expansion of the ER-SDE's exact solution in D around σ:

    x' = r·x + (1 − r)·D                                                      (stage 1)
       + (σ' − σ + φ(σ')·∫_{σ'}^{σ} dς/φ)·D′                                   (stage 2)
       + ((σ' − σ)²/2 + φ(σ')·∫_{σ'}^{σ} (ς − σ)/φ dς)·D″                      (stage 3)
       + √(σ'² − σ²r²)·s_noise·z,

D′ = (D − D₋₁)/(σ − σ₋₁) and D″ = (D′ − D′₋₁)/((σ − σ₋₂)/2) from the previous steps' D (as the
authors' code and ComfyUI have them), stage k = min(``max_stage``, steps so far + 1).
``noise_scaler``: ComfyUI's and the paper's default ER-SDE 5, φ(ς) = ς·(e^(ς^0.3) + 10) (``default``);
``ode``, φ(ς) = ς (r = σ'/σ, no noise: the probability-flow ODE, stage 1 = DDIM); ``sde``, φ(ς) = ς²
(the reverse-time SDE, stage 1 = ``euler_ancestral``). ``quadrature``: the integrals to rounding
(``exact``) or by the 200-point sum of the authors' code and ComfyUI (``riemann``). The step to
σ = 0 returns D. NFE 1 per step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import Choice, ConfigError, SamplerState, er_sde_integrals, hookimpl


class NoiseScaler(Choice):
    """The noise scale function φ(ς) = ς·g(ς): ER-SDE 5 (``default``), the ODE (``ode``) or the
    reverse-time SDE (``sde``)."""

    default = "default"
    ode = "ode"
    sde = "sde"


class Quadrature(Choice):
    """The stage integrals: to rounding (``exact``) or by the authors' and ComfyUI's 200-point sum."""

    exact = "exact"
    riemann = "riemann"


def _g_default(s: float) -> float:
    return math.exp(s**0.3) + 10.0 if math.isfinite(s) else math.inf


SCALERS = {"default": _g_default, "ode": lambda s: 1.0, "sde": lambda s: s}


@dataclass
class ERSDE:
    max_stage: int = 3
    s_noise: float = 1.0
    noise_scaler: NoiseScaler = NoiseScaler.default
    quadrature: Quadrature = Quadrature.exact

    def __post_init__(self) -> None:
        if not 1 <= self.max_stage <= 3:
            raise ConfigError(f"solver.max_stage must be 1, 2 or 3, got {self.max_stage}")
        if self.s_noise < 0:
            raise ConfigError(f"solver.s_noise must be ≥ 0, got {self.s_noise}")

    def _noise_std(self, q: float, sigma_next: float) -> float:
        """s_noise·√(σ'² − (σ·r)²) = s_noise·σ'·√(1 − q²), q = g(σ')/g(σ) (exactly 0 for the ODE scaler)."""
        return self.s_noise * sigma_next * math.sqrt(max(1.0 - q * q, 0.0))

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        g = SCALERS[str(self.noise_scaler)]
        s, t = state.sigma, state.sigma_next
        phi_t = t * g(t)
        r = phi_t / (s * g(s))
        d = pred.denoised
        x = r * pred.x + (1 - r) * d
        past = state.history
        stage = min(self.max_stage, len(past) + 1)
        if stage >= 2:
            i1, i2 = er_sde_integrals(g, s, t, riemann=self.quadrature == "riemann")
            prev = past[-1]
            d1 = (d - prev.direction) / (s - prev.sigma)
            x = x + (t - s + phi_t * i1) * d1
            if stage >= 3:
                prev2 = past[-2]
                d1_old = (prev.direction - prev2.direction) / (prev.sigma - prev2.sigma)
                x = x + ((t - s) ** 2 / 2 + phi_t * i2) * ((d1 - d1_old) / ((s - prev2.sigma) / 2))
        std = self._noise_std(g(t) / g(s), t)
        return x + state.noise(s, t) * std if std > 0 else x

    def step_from_infinity(self, state: SamplerState) -> torch.Tensor:
        """The first-order step's limit from σ = ∞ (the state there is the unit noise ε): σ·r →
        σ'·g(σ')/g(∞), so x' = D + a·ε + √(σ'² − a²)·s_noise·z with a = σ' (``ode``) or 0."""
        g = SCALERS[str(self.noise_scaler)]
        t = state.sigma_next
        q = g(t) / g(math.inf)
        x = state.pred.denoised + t * q * state.pred.x
        std = self._noise_std(q, t)
        return x + state.noise() * std if std > 0 else x
