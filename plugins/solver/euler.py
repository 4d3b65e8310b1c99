"""Euler's method on the probability-flow ODE dx/dσ = (x − D)/σ (Karras et al. 2022, Algorithm 1
without the correction); deterministic DDIM is this step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from framework.plugin import hookimpl


@dataclass
class Euler:
    steps_along_denoised: ClassVar[bool] = True  # momentum plugins compose (framework.bases.momentum)
    capturable: ClassVar[bool] = True  # compile=step: tensor arithmetic of σ only

    @hookimpl
    def step(self, state, denoise):
        pred = state.pred
        return pred.x + (state.sigma_next - state.sigma) * pred.derivative
