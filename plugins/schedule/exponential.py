"""Exponential schedule (k-diffusion ``get_sigmas_exponential``): σ uniform in log σ from σ_max to
σ_min — uniform in log-SNR, i.e. equal steps in λ = −log σ, DPM-Solver's "logSNR" grid (Lu et al.
2022) — then 0 (``final_zero``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import InitNoise, finish, hookimpl, sigma_range


@dataclass
class Exponential:
    sigma_min: float | None = None  # default: the model's
    sigma_max: float | None = None  # default: the model's
    final_zero: bool = True
    init_noise: InitNoise = InitNoise.sigma

    @hookimpl
    def schedule(self, model, steps):
        lo, hi = sigma_range(model, self.sigma_min, self.sigma_max)
        n = steps if self.final_zero else steps + 1
        body = np.exp(np.linspace(np.log(hi), np.log(lo), n)) if n > 1 else np.array([hi])
        return finish(body, self.final_zero, self.init_noise)
