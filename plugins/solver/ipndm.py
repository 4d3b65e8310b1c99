"""iPNDM (Zhang & Chen 2023, "DEIS", §4 / App. improved PNDM; k-diffusion ``sample_ipndm``):
the fixed-coefficient Adams–Bashforth method on dx/dσ = (x − D)/σ with a lower-order warm-up
instead of PNDM's Runge–Kutta start: step i uses AB_k, k = min(i + 1, ``max_order``) ≤ 4.
NFE 1 per step; the last step to σ = 0 keeps its order (no evaluation at 0). The coefficients
assume equal steps: on a non-uniform grid (karras) the asymptotic order drops (measured in
docs/solvers.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, fixed_adams_bashforth, hookimpl


@dataclass
class IPNDM:
    max_order: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.max_order <= 4:
            raise ConfigError(f"solver.max_order must be in 1..4, got {self.max_order}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        return fixed_adams_bashforth(state, self.max_order)
