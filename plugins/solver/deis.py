"""DEIS, the diffusion exponential integrator sampler (Zhang & Chen 2023), multistep ρAB-DEIS with
log-ρ interpolation (diffusers' DEISMultistepScheduler, ``solver_type="logrho"``; ComfyUI's ``deis``
is the tableau form, ``solver=deis_tab``). In σ-space (ρ = σ) the ODE dx/dρ = ε(x, ρ) has no
linear part; the last ``order`` noise estimates ε = (x − D)/σ are interpolated by a polynomial in
log σ and integrated over σ ∈ [σ, σ_next] (``framework.maths.sigmas.log_lagrange_integral_weights``). Warm-up: step i uses min(i + 1, order)
points. ``lower_order_final`` follows diffusers: with fewer than 15 steps the last step is first
order and the one before at most second. A step to σ = 0 is first order (Euler: lands on D).
NFE 1 per step; order ``order``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import (
    ConfigError, SamplerState, hookimpl, log_lagrange_integral_weights, multistep_order, multistep_update,
    recent_derivatives,
)


@dataclass
class DEIS:
    order: int = 3
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 4:
            raise ConfigError(f"solver.order must be in 1..4, got {self.order}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        p = multistep_order(self.order, len(state.history), state.index, state.schedule.steps,
                           state.sigma_next == 0, self.lower_order_final)
        if p == 1:
            return pred.x + (state.sigma_next - state.sigma) * pred.derivative
        nodes, eps = recent_derivatives(state, p)
        return multistep_update(pred.x, log_lagrange_integral_weights(nodes, state.sigma, state.sigma_next), eps)
