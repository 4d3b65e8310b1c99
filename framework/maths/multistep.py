"""Fixed-coefficient Adams–Bashforth steps on ε = (x − D)/σ (PLMS, iPNDM): weights for equal steps."""
from __future__ import annotations

import torch

from framework.core.step import SamplerState

AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def fixed_adams_bashforth(state: SamplerState, max_order: int) -> torch.Tensor:
    """x + Δσ·Σ c_j ε_{i−j} with the uniform-step AB_k weights, k = min(i + 1, max_order)."""
    k = min(len(state.history) + 1, max_order)
    past = state.history[len(state.history) - (k - 1) :]
    eps = [state.pred.derivative] + [(r.x - r.direction) / r.sigma for r in reversed(past)]
    x = state.pred.x
    dt = state.sigma_next - state.sigma
    for c, e in zip(AB[k], eps):
        x = x + (dt * c) * e
    return x
