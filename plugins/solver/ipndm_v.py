"""iPNDM-v (Zhang & Chen 2023; k-diffusion ``sample_ipndm_v``): iPNDM with variable-step
Adams–Bashforth coefficients, i.e. the derivative (x − D)/σ of the last k steps interpolated by a
polynomial in σ and integrated over the step (k = min(i + 1, ``max_order``) ≤ 4). In σ-space this
is the same method as ``lms`` with ``order = max_order`` (one maths, two names;
``framework.maths.sigmas.lagrange_integral_weights``). NFE 1 per step; order ``max_order``."""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import ConfigError
from plugins.solver.lms import LMS


@dataclass
class IPNDMV(LMS):
    max_order: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.max_order <= 4:
            raise ConfigError(f"solver.max_order must be in 1..4, got {self.max_order}")
        self.order = self.max_order
