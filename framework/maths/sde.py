"""Noise terms and weights of the SDE solvers that step in λ = −log σ (SEEDS, exp_heun_2_x0_sde,
SA-Solver) or in σ (ER-SDE), written once.

**The SDE family.** With h = λ' − λ > 0 over a step σ → σ' and a stochasticity η ≥ 0 (SEEDS' η,
SA-Solver's τ², DPM-Solver++ SDE's η), the exact solution of the diffusion SDE in σ-space is

    x' = (σ'/σ)·e^(−ηh)·x + (1 + η)·∫_λ^λ' e^(−(1+η)(λ'−u))·D(u) du + σ'·√(1 − e^(−2ηh))·z,

η = 0 being the probability-flow ODE (Lu et al. 2022b; Gonzalez et al. 2023, SEEDS §3; Xue et al.
2023, SA-Solver eq. 9). :func:`noise_factor` is √(1 − e^(−2ηh)); :func:`ou_extend` continues the
standardised noise of a sub-interval [λ, λ_a] to [λ, λ_b] with a fresh draw for [λ_a, λ_b], so that
the stages of a multi-stage step (SEEDS) see one Brownian path (SEEDS' treatment of the stochastic
components: the noise of stage j is the noise of stage j − 1, decayed, plus an independent
increment, and its variance is exact on every sub-interval).

**Stochastic Adams weights.** :func:`stochastic_adams_weights` integrates a Lagrange polynomial in λ
through earlier D values against the kernel above (SA-Solver eqs. 14–15, data prediction), exactly,
with φ-functions: (1 + η)·∫_0^h e^(−(1+η)(h−u))·u^m du = (1 + η)·m!·h^(m+1)·φ_{m+1}(−(1+η)h).

**ER-SDE integrals.** :func:`er_sde_integrals` are the two integrals of the ER-SDE-Solver's
second- and third-order terms (Cui et al. 2023, "Elucidating the solution space of extended
reverse-time SDEs", VE form): ∫_{σ'}^{σ} dς/φ(ς) and ∫_{σ'}^{σ} (ς − σ)/φ(ς) dς for the noise
scale function φ(ς) = ς·g(ς).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from framework.maths.exponential import phi

_GL_X, _GL_W = np.polynomial.legendre.leggauss(32)


def noise_factor(eta_h: float) -> float:
    """√(1 − e^(−2ηh)): the standard deviation, relative to σ', of the SDE's noise over a λ-step h
    at stochasticity η (``eta_h`` = η·h ≥ 0; ∞ gives 1)."""
    return math.sqrt(-math.expm1(-2.0 * eta_h)) if eta_h > 0 else 0.0


def ou_extend(prev: torch.Tensor, z: torch.Tensor, eta_dh: float) -> torch.Tensor:
    """Standardised noise over [λ, λ_b] from that over [λ, λ_a] (``prev``) and a fresh unit draw
    ``z`` for [λ_a, λ_b], ``eta_dh`` = η·(λ_b − λ_a): e^(−η·Δ)·prev + √(1 − e^(−2η·Δ))·z.
    Its variance is 1 − e^(−2η(λ_b − λ)) when ``prev``'s is 1 − e^(−2η(λ_a − λ))."""
    return prev * math.exp(-eta_dh) + z * noise_factor(eta_dh)


def _poly_in_offset(nodes: Sequence[float], j: int, origin: float) -> np.ndarray:
    """Coefficients (increasing powers of u = λ − origin) of the Lagrange basis ℓ_j on ``nodes``."""
    u = [n - origin for n in nodes]
    others = [u[m] for m in range(len(u)) if m != j]
    denom = math.prod(u[j] - o for o in others)
    return np.polynomial.polynomial.polyfromroots(others) / denom if others else np.array([1.0])


def stochastic_adams_weights(nodes: Sequence[float], lam: float, lam_next: float, eta: float) -> list[float]:
    """b_j such that Σ_j b_j·D_j = (1 + η)·∫_λ^λ' e^(−(1+η)(λ'−u))·P(u) du, P the polynomial through
    (nodes_j, D_j) (SA-Solver's predictor when λ is the newest node, its corrector when λ' is).
    One node gives 1 − e^(−(1+η)h): the first-order (DDIM / DPM-Solver++ SDE) weight."""
    c, h = 1.0 + eta, lam_next - lam
    # ∫_0^h e^(−c(h−u))·u^m du = m!·h^(m+1)·φ_{m+1}(−ch)
    moments = [math.factorial(m) * h ** (m + 1) * phi(m + 1, -c * h) for m in range(len(nodes))]
    return [c * float(np.dot(_poly_in_offset(nodes, j, lam), moments[: len(nodes)])) for j in range(len(nodes))]


def er_sde_integrals(g: Callable[[float], float], sigma: float, sigma_next: float, riemann: bool = False) -> tuple[float, float]:
    """(∫_{σ'}^{σ} dς/φ(ς), ∫_{σ'}^{σ} (ς − σ)/φ(ς) dς) for φ(ς) = ς·g(ς), 0 < σ' < σ.

    Default: 32-point Gauss–Legendre in u = log ς (dς/φ = du/g: a smooth, bounded integrand), exact
    to rounding for the built-in scalers. ``riemann``: the left sum over 200 equally spaced ς of the
    authors' code (ER-SDE-Solver's ``er_sde_solver.py``) and ComfyUI's ``sample_er_sde``."""
    if riemann:
        step = (sigma - sigma_next) / 200.0
        pos = sigma_next + np.arange(200.0) * step
        gs = np.array([g(p) for p in pos])
        return float(np.sum(1.0 / (pos * gs)) * step), float(np.sum((pos - sigma) / (pos * gs)) * step)
    a, b = math.log(sigma_next), math.log(sigma)
    u = 0.5 * (b - a) * _GL_X + 0.5 * (a + b)
    w = 0.5 * (b - a) * _GL_W
    s = np.exp(u)
    gs = np.array([g(v) for v in s])
    return float(np.sum(w / gs)), float(np.sum(w * (s - sigma) / gs))
