"""KL-optimal schedule (Sabour et al. 2024, "Align Your Steps", §3 / App.: the schedule minimising
the KL upper bound for a Gaussian data model; ComfyUI's ``kl_optimal``): σ_i = tan((1 − i/(N−1))·
atan σ_max + i/(N−1)·atan σ_min), i.e. uniform in atan σ, then 0."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from framework.plugin import InitNoise, finish, hookimpl, sigma_range


@dataclass
class KLOptimal:
    sigma_min: float | None = None
    sigma_max: float | None = None
    init_noise: InitNoise = InitNoise.sigma

    @hookimpl
    def schedule(self, model, steps):
        lo, hi = sigma_range(model, self.sigma_min, self.sigma_max)
        w = np.linspace(0.0, 1.0, steps) if steps > 1 else np.array([0.0])
        return finish(np.tan((1 - w) * np.arctan(hi) + w * np.arctan(lo)), True, self.init_noise)
