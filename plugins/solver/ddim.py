"""DDIM (Song et al. 2021) in σ-space: a deterministic step to σ_down, then fresh noise of std σ_up
(``framework.maths.sigmas.ancestral_split``; η = 0 is the ODE, where DDIM is the Euler step, η = 1 the
DDPM posterior)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from framework.plugin import ConfigError, ancestral_split, hookimpl


@dataclass
class DDIM:
    steps_along_denoised: ClassVar[bool] = True  # momentum plugins compose (framework.bases.momentum)

    eta: float = 0.0

    @property
    def capturable(self) -> bool | str:
        """compile=step: η = 0 is tensor arithmetic of σ; η > 0 draws noise from per-sample generators."""
        return True if self.eta == 0 else "η > 0 draws fresh noise every step"

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")

    @hookimpl
    def step(self, state, denoise):
        pred = state.pred
        if self.eta == 0:  # the ODE: σ_down = σ_next, σ_up = 0
            return pred.x + (state.sigma_next - state.sigma) * pred.derivative
        sigma_down, sigma_up = ancestral_split(state.sigma, state.sigma_next, self.eta)
        x = pred.x + (sigma_down - state.sigma) * pred.derivative
        if sigma_up > 0:
            x = x + sigma_up * state.noise(state.sigma, state.sigma_next)
        return x
