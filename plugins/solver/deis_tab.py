"""DEIS in its tableau form, tAB-DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
Exponential Integrator"; ComfyUI's ``deis``, ``deis_mode="tab"``, after diff-sampler): the noise
estimates d = (x − D)/σ of the last k steps are extrapolated by a Lagrange polynomial in the VP time
t(σ) and integrated exactly,

    x' = x + Σ_j C_j·d_{i−j},   C_j = ∫_{t(σ)}^{t(σ')} (dσ/dτ)·ℓ_j(τ) dτ,   k = min(i + 1, ``order``) ≤ 4,

ℓ_j the Lagrange basis on t(σ_{i−j}) (in σ-space the exponential integrator's linear part
vanishes). t(σ) is the VP-SDE time with σ(t)² = exp(β_d·t²/2 + β_min·t) − 1, t(``t_sigma_min``) =
``t_eps``, t(``t_sigma_max``) = 1 (EDM's VP mapping; ComfyUI: 0.002, 80, 1e-3 for every model).
``framework.maths.multistep.deis_tab_weights`` computes C_j: ``quadrature: exact`` (default;
Gauss–Legendre, to rounding) or ``riemann``, ComfyUI's sum over 10,000 equally spaced τ, whose
O(1/N) error moves a 5-step run by up to 7e-4 relative (docs/solvers.md). The step to σ = 0 is
Euler (lands on D), as in ComfyUI; no lower-order final steps otherwise. NFE 1 per step; order
``order`` (measured in docs/solvers.md). The log-ρ variant of diffusers is ``solver=deis``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import (
    Choice, ConfigError, SamplerState, VPTime, deis_tab_weights, hookimpl, multistep_update, recent_derivatives,
)


class Quadrature(Choice):
    """How C_j is integrated: to rounding (``exact``) or by ComfyUI's 10,000-point sum (``riemann``)."""

    exact = "exact"
    riemann = "riemann"


@dataclass
class DEISTab:
    order: int = 3
    quadrature: Quadrature = Quadrature.exact
    t_sigma_min: float = 0.002
    t_sigma_max: float = 80.0
    t_eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 4:
            raise ConfigError(f"solver.order must be in 1..4, got {self.order}")
        if not (0 < self.t_sigma_min < self.t_sigma_max and 0 < self.t_eps < 1):
            raise ConfigError("solver=deis_tab needs 0 < t_sigma_min < t_sigma_max and 0 < t_eps < 1")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        k = min(len(state.history) + 1, self.order)
        if state.sigma_next == 0 or k == 1:
            return pred.x + (state.sigma_next - state.sigma) * pred.derivative
        sigmas, ds = recent_derivatives(state, k)
        time = VPTime(self.t_sigma_min, self.t_sigma_max, self.t_eps)
        weights = deis_tab_weights(sigmas, state.sigma, state.sigma_next, time, self.quadrature == "riemann")
        return multistep_update(pred.x, weights, ds)
