"""iPNDM, improved PNDM (Zhang & Chen 2023, "DEIS", the improved PNDM of its appendix; diff-sampler's
``ipndm_sampler``, ComfyUI's ``sample_ipndm``): Adams–Bashforth on dx/dσ = d = (x − D)/σ with the
equal-step weights and a lower-order warm-up instead of PNDM's Runge–Kutta start,

    x' = x + (σ' − σ)·Σ_j AB_k[j]·d_{i−j},   k = min(i + 1, ``max_order``) ≤ 4,

AB_2 = (3, −1)/2, AB_3 = (23, −16, 5)/12, AB_4 = (55, −59, 37, −9)/24. NFE 1 per step. The step to
σ = 0 (``final``): ``multistep`` (default) takes the AB step there (no evaluation at 0 is needed);
``denoise`` returns D, as ComfyUI's ``ipndm`` does. The weights assume equal steps: on a non-uniform
grid (karras) the order drops to 2 (measured in docs/solvers.md)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from framework.plugin import AB, Choice, ConfigError, SamplerState, hookimpl, multistep_update, recent_derivatives


class Final(Choice):
    """The step to σ = 0: the multistep update (``multistep``) or D (``denoise``, ComfyUI)."""

    multistep = "multistep"
    denoise = "denoise"


@dataclass
class IPNDM:
    max_order: int = 4
    final: Final = Final.multistep

    def __post_init__(self) -> None:
        if not 1 <= self.max_order <= 4:
            raise ConfigError(f"solver.max_order must be in 1..4, got {self.max_order}")

    def coefficients(self, sigmas: Sequence[float], sigma_next: float) -> Sequence[float]:
        """c_j of x' = x + (σ' − σ)·Σ c_j·d_j; ``sigmas`` are the k evaluation points, newest first."""
        return AB[len(sigmas)]

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        if state.sigma_next == 0 and self.final == "denoise":
            return state.pred.denoised
        sigmas, ds = recent_derivatives(state, min(len(state.history) + 1, self.max_order))
        dt = state.sigma_next - state.sigma
        return multistep_update(state.pred.x, [dt * c for c in self.coefficients(sigmas, state.sigma_next)], ds)
