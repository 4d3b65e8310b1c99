"""DPM-Solver++ multistep as a momentum plugin on a ddim/euler base (Lu et al. 2022b, "DPM-Solver++:
Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2 and its third-order
update): the denoised estimate of the last ``order`` steps is extrapolated in λ = −log σ with the
exponential integrator's (φ-function) weights. On the base step x' = (σ'/σ)·x − expm1(−h)·D̃
(h = λ' − λ), order 2 is DPM-Solver++(2M), D̃ = D + (D − D₋₁)/(2r₀), and order 3 is diffusers'
third-order multistep update (DPM-Solver++(3M)). Warm-up: step i uses min(i + 1, order) points; the
step to σ = 0 is first order (lands on D); with fewer than 15 steps the second-to-last step is at
most second order (diffusers' ``lower_order_final``). order = 1 is the base solver. Reads the raw
first evaluations of past steps from the history. The derivative extrapolated in σ instead (LMS)
is ``multistep_sigma``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.plugin import ConfigError, MomentumPlugin, hookimpl, lam


@dataclass
class Multistep(MomentumPlugin):
    order: int = 2
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 3:
            raise ConfigError(f"momentum.multistep.order must be in 1..3, got {self.order}")

    @hookimpl
    def momentum(self, state, pred):
        k = min(self.order, len(state.history) + 1)
        if k == 1 or state.sigma_next == 0:
            return pred
        if self.lower_order_final and state.schedule.steps < 15 and state.index == state.schedule.steps - 2:
            k = min(k, 2)
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
