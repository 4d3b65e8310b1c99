"""Multistep history methods as a momentum plugin on a single-evaluation base (euler/ddim).

``variable=denoised_lambda`` — extrapolate the denoised estimate in λ = −log σ with the
exponential-integrator (φ-function) weights of DPM-Solver++ (Lu et al. 2022b): on a ddim/euler base
(x' = (σ'/σ)·x − expm1(−h)·D̃, h = λ' − λ) order 2 is DPM-Solver++(2M), D̃ = D + (D − D₋₁)/(2r₀),
and order 3 is diffusers' third-order multistep update (DPM-Solver++(3M)). Warm-up: step i uses
min(i + 1, order) points; the step to σ = 0 is first order (lands on D); with fewer than 15 steps
the second-to-last step is at most second order (diffusers' ``lower_order_final``).

``variable=derivative_sigma`` — extrapolate the derivative d = (x − D)/σ with Adams–Bashforth
(Lagrange) weights in σ, integrated exactly over [σ, σ']: on an euler base this is the linear
multistep method ``lms`` (k-diffusion, diffusers' LMSDiscreteScheduler), full order to the end.

Both read the raw first evaluations of past steps from the history. order = 1 is the base solver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.plugin import (
    ConfigError, MomentumPlugin, hookimpl, lagrange_integral_weights, lam, past_derivative,
)

MAX_ORDER = {"denoised_lambda": 3, "derivative_sigma": 4}


@dataclass
class Multistep(MomentumPlugin):
    order: int = 2
    variable: str = "denoised_lambda"
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if self.variable not in MAX_ORDER:
            raise ConfigError(f"multistep.variable must be one of {', '.join(MAX_ORDER)}, got '{self.variable}'")
        if not 1 <= self.order <= MAX_ORDER[self.variable]:
            raise ConfigError(f"multistep.order must be in 1..{MAX_ORDER[self.variable]} for {self.variable}, got {self.order}")

    @hookimpl
    def momentum(self, state, pred):
        k = min(self.order, len(state.history) + 1)
        if k == 1:
            return pred
        if self.variable == "derivative_sigma":
            return self._adams_bashforth(state, pred, k)
        if state.sigma_next == 0:
            return pred
        if self.lower_order_final and state.schedule.steps < 15 and state.index == state.schedule.steps - 2:
            k = min(k, 2)
        return self._exponential(state, pred, k)

    def _adams_bashforth(self, state, pred, k):
        past = state.history[-(k - 1):][::-1]
        nodes = [pred.sigma] + [r.sigma for r in past]
        ds = [pred.derivative] + [past_derivative(r) for r in past]
        w = lagrange_integral_weights(nodes, pred.sigma, state.sigma_next)
        dt = state.sigma_next - pred.sigma
        d = sum(wj / dt * dj for wj, dj in zip(w, ds))
        return pred.with_denoised(pred.x - pred.sigma * d)

    def _exponential(self, state, pred, k):
        h = lam(state.sigma_next) - lam(pred.sigma)
        m0, r1 = pred.denoised, state.history[-1]
        r0 = (lam(pred.sigma) - lam(r1.sigma)) / h
        d1_0 = (m0 - r1.denoised) / r0
        if k == 2:
            return pred.with_denoised(m0 + 0.5 * d1_0)
        r2 = state.history[-2]
        rr = (lam(r1.sigma) - lam(r2.sigma)) / h
        d1_1 = (r1.denoised - r2.denoised) / rr
        d1 = d1_0 + r0 / (r0 + rr) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + rr)
        phi = math.expm1(-h)
        return pred.with_denoised(m0 - ((phi / h + 1) * d1 - ((phi + h) / h**2 - 0.5) * d2) / phi)
