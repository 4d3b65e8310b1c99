"""Align Your Steps (Sabour et al. 2024): the published optimised 10-step σ grid for Stable
Diffusion 1.5 (NVIDIA's project page; ComfyUI's ``AlignYourStepsScheduler`` "SD1"), resampled
log-linearly to other step counts (``framework.maths.sigmas.loglinear_interp`` over N + 1 points); the
last σ is then replaced by 0, as ComfyUI does. Meant for SD 1.x (σ from 14.6 to 0.029); model
time of each σ by log-σ interpolation. On a flow model (SD3, Flux) the grid is composed with the
model's shift, a constant factor on σ, as every other schedule is."""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import InitNoise, finish, hookimpl, loglinear_interp

SD15 = (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
        0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582)


@dataclass
class AYS:
    init_noise: InitNoise = InitNoise.sigma

    @hookimpl
    def schedule(self, model, steps):
        grid = list(SD15) if steps + 1 == len(SD15) else loglinear_interp(list(SD15), steps + 1)
        shift = float(getattr(model, "sigma_shift", 1.0))  # a flow model's shift, a factor on σ (docs/models.md)
        return finish([shift * s for s in grid[:-1]], True, self.init_noise)
