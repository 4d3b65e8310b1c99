"""φ-functions of exponential integrators (Hochbruck & Ostermann 2010), written once for every
solver that steps in λ = −log σ (DPM-Solver, RES, exponential Runge–Kutta tableaux, SA-Solver…).

φ_0(z) = e^z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z, i.e. φ_k(z) = Σ_{j≥0} z^j/(j+k)!.
In σ-space the data-prediction step over h = λ' − λ is x' = (σ'/σ)·x + h·Σ_j b_j(h)·D_j with
weights built from φ_k(−h) (e.g. x' = e^(−h)x + h·φ_1(−h)·D for the first-order step, which is DDIM).
"""
from __future__ import annotations

import math


def phi(k: int, z: float) -> float:
    """φ_k(z) in float64: the power series for |z| < 1 (no cancellation), the recurrence otherwise."""
    if k < 0:
        raise ValueError(f"phi: k must be ≥ 0, got {k}")
    if abs(z) < 1.0:
        term, total, j = 1.0 / math.factorial(k), 0.0, 0
        while abs(term) > 1e-18 * max(abs(total), 1e-300):
            total += term
            j += 1
            term *= z / (j + k)
        return total
    value = math.exp(z)
    for m in range(k):
        value = (value - 1.0 / math.factorial(m)) / z
    return value


def phis(h: float, count: int) -> list[float]:
    """[φ_1(−h), …, φ_count(−h)]: the weights a λ-step of size h needs."""
    return [phi(k, -h) for k in range(1, count + 1)]
