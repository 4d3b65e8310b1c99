"""Exponential schedule (k-diffusion ``get_sigmas_exponential``): σ uniform in log σ from σ_max to
σ_min — uniform in log-SNR, i.e. equal steps in λ = −log σ, DPM-Solver's "logSNR" grid (Lu et al.
2022) — then 0 (``final_zero``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.core.markers import hookimpl
from framework.core.errors import ConfigError
from framework.maths.sigmas import INIT_NOISE_MODES, init_noise_scale, sigma_range
from framework.core.state import Schedule


def finish(body: np.ndarray | list[float], final_zero: bool, init_noise: str) -> Schedule:
    """A Schedule from the positive part of a grid: optional final 0, initial noise scale."""
    grid = tuple(float(s) for s in body) + ((0.0,) if final_zero else ())
    return Schedule(grid, None, init_noise_scale(grid[0], init_noise))


def check_init_noise(init_noise: str) -> None:
    if init_noise not in INIT_NOISE_MODES:
        raise ConfigError(f"schedule.init_noise must be one of {', '.join(INIT_NOISE_MODES)}, got '{init_noise}'")


@dataclass
class Exponential:
    sigma_min: float | None = None  # default: the model's
    sigma_max: float | None = None  # default: the model's
    final_zero: bool = True
    init_noise: str = "sigma"

    def __post_init__(self) -> None:
        check_init_noise(self.init_noise)

    @hookimpl
    def schedule(self, model, steps):
        lo, hi = sigma_range(model, self.sigma_min, self.sigma_max, "exponential")
        n = steps if self.final_zero else steps + 1
        body = np.exp(np.linspace(np.log(hi), np.log(lo), n)) if n > 1 else np.array([hi])
        return finish(body, self.final_zero, self.init_noise)
