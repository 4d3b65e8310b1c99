"""Linear multistep (Adams–Bashforth) in σ (Karras et al. 2022's k-diffusion ``sample_lms``;
diffusers' LMSDiscreteScheduler): the derivative (x − D)/σ of the last ``order`` steps is
interpolated by a polynomial in σ and integrated exactly over [σ, σ_next]
(``framework.maths.sigmas.lagrange_integral_weights``). Warm-up: step i uses min(i + 1, order) points.
Order ``order``, NFE 1 per step; the last step to σ = 0 needs no evaluation there and keeps the
full order (as diffusers and k-diffusion do)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, hookimpl, lagrange_integral_weights


@dataclass
class LMS:
    order: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 6:
            raise ConfigError(f"solver.order must be in 1..6, got {self.order}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        past = state.history[max(0, len(state.history) - self.order + 1) :]
        nodes = [state.sigma] + [r.sigma for r in reversed(past)]
        ds = [state.pred.derivative] + [(r.x - r.direction) / r.sigma for r in reversed(past)]
        weights = lagrange_integral_weights(nodes, state.sigma, state.sigma_next)
        x = state.pred.x
        for w, d in zip(weights, ds):
            x = x + w * d
        return x
