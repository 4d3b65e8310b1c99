"""Heun's second-order method (Karras et al. 2022, Algorithm 1); the last step to σ = 0 is Euler,
so N steps cost 2N − 1 evaluations on a grid ending at 0."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from framework.plugin import hookimpl


@dataclass
class Heun:
    capturable: ClassVar[bool] = True  # compile=step: tensor arithmetic of σ, both evaluations in the graph

    @hookimpl
    def step(self, state, denoise):
        pred = state.pred
        d = pred.derivative
        dt = state.sigma_next - state.sigma
        x_next = pred.x + dt * d
        if state.to_zero:
            return x_next
        d_next = denoise(x_next, state.sigma_next).derivative
        return pred.x + dt * (d + d_next) / 2
