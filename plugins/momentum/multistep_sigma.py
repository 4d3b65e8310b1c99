"""Linear multistep in σ as a momentum plugin on an euler base (Adams–Bashforth with variable steps;
k-diffusion's ``sample_lms`` after Karras et al. 2022, diffusers' LMSDiscreteScheduler): the
derivative d = (x − D)/σ of the last ``order`` steps is interpolated by a polynomial in σ and
integrated exactly over [σ, σ'] (Lagrange weights), full order to the end. On euler it is
``solver=lms`` with the same order. Warm-up: step i uses min(i + 1, order) points; order = 1 is the
base solver. Reads the raw first evaluations of past steps from the history. The denoised estimate
extrapolated in λ instead (DPM-Solver++) is ``multistep``.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import ConfigError, MomentumPlugin, hookimpl, lagrange_integral_weights, past_derivative


@dataclass
class MultistepSigma(MomentumPlugin):
    order: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 4:
            raise ConfigError(f"momentum.multistep_sigma.order must be in 1..4, got {self.order}")

    @hookimpl
    def momentum(self, state, pred):
        k = min(self.order, len(state.history) + 1)
        if k == 1:
            return pred
        past = state.history[-(k - 1):][::-1]
        nodes = [pred.sigma] + [r.sigma for r in past]
        ds = [pred.derivative] + [past_derivative(r) for r in past]
        w = lagrange_integral_weights(nodes, pred.sigma, state.sigma_next)
        dt = state.sigma_next - pred.sigma
        return pred.with_denoised(pred.x - pred.sigma * sum(wj / dt * dj for wj, dj in zip(w, ds)))
