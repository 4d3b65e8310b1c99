"""SA-Solver, the stochastic Adams solver (Xue et al. 2023, NeurIPS, arXiv:2309.05019; diffusers'
SASolverScheduler, data prediction; ComfyUI's ``sa_solver`` and ``sa_solver_pece``), in σ-space.
λ = −log σ, h = λ' − λ, τ = τ(σ) the stochasticity (``eta`` inside [``tau_sigma_min``,
``tau_sigma_max``], 0 outside; evaluated at the step's σ, as diffusers' ``tau_func`` at its t):

- SA-Predictor (eq. 14): x' = (σ'/σ)e^(−τ²h)·x + Σ_j b_j·D_j + σ'·√(1 − e^(−2τ²h))·s_noise·z, b_j
  the exponentially weighted integrals of the Lagrange basis in λ through the last p steps' D
  (``framework.maths.sde.stochastic_adams_weights``), p = ``predictor_order``;
- SA-Corrector (eq. 18): once D is known at the predicted x', the same step from x is redone with
  the Lagrange polynomial through D(x') and the c − 1 D before it, reusing the predictor's noise z,
  c = ``corrector_order`` (0: no corrector). The step after it predicts from the corrected point;
  ``pece`` (``sa_solver_pece``) evaluates D again there (2 NFE per step instead of 1).

With two points, ``simple_order_2`` replaces the exact second-order weights by the paper's simple
ones (Appendix D; the weight of the difference is (1+τ²)h²/2 over the node spacing, or (1+τ²)h/2
in the corrector; diffusers always uses them, ComfyUI by option). Orders warm up as the history
grows; ``lower_order_final`` caps them as diffusers does (predictor ≤ N − i, corrector ≤ N − i + 2).
τ = 0 is the deterministic multistep method; p = 1 without corrector is DDIM, p = 2 without
corrector DPM-Solver++(2M) with the φ₂ (``heun``) weight. The step to σ = 0 returns D (the order-1
limit); with ``pece`` that D is the corrected point's. Defaults are ComfyUI's (p = 3, c = 4,
τ = 1 for σ in SD's σ at 80 %…20 % of the model time: 5.0924…0.57119); diffusers' defaults are
p = c = 2 with the simple weights, i.e. ``predictor_order=2 corrector_order=2 simple_order_2=true``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from framework.plugin import ConfigError, SamplerState, hookimpl, lam, noise_factor, stochastic_adams_weights


@dataclass
class _Trail:
    """One trajectory's past: λ and D of the finished steps, oldest first; the point the last
    predictor stepped from, its σ, its noise term and τ."""

    lams: list[float] = field(default_factory=list)
    ds: list[torch.Tensor] = field(default_factory=list)
    x: torch.Tensor | None = None
    sigma: float = 0.0
    noise: torch.Tensor | None = None
    tau: float = 0.0


def _simple(weights: list[float], nodes: list[float], lam_s: float, lam_t: float, tau: float, corrector: bool) -> list[float]:
    """The paper's simple two-point weights (Appendix D): total 1 − e^(−(1+τ²)h) kept, the newest
    node's share moved so that the difference term is (1+τ²)h²/2/(λ₀ − λ₁) (predictor) or (1+τ²)h/2
    (corrector)."""
    c, h = 1 + tau**2, lam_t - lam_s
    total = -math.expm1(-c * h)
    newest = c * h / 2 if corrector else total + c * h * h / 2 / (nodes[0] - nodes[1])
    return [newest, total - newest]


@dataclass
class SASolver:
    predictor_order: int = 3
    corrector_order: int = 4
    pece: bool = False
    eta: float = 1.0
    tau_sigma_min: float = 0.5711888666489997
    tau_sigma_max: float = 5.09240759066568
    s_noise: float = 1.0
    simple_order_2: bool = False
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.predictor_order <= 4:
            raise ConfigError(f"solver.predictor_order must be in 1..4, got {self.predictor_order}")
        if not 0 <= self.corrector_order <= 4:
            raise ConfigError(f"solver.corrector_order must be in 0..4 (0: no corrector), got {self.corrector_order}")
        if self.eta < 0 or self.s_noise < 0:
            raise ConfigError(f"solver.eta and solver.s_noise must be ≥ 0, got {self.eta} and {self.s_noise}")
        if not 0 <= self.tau_sigma_min <= self.tau_sigma_max:
            raise ConfigError("solver=sa_solver needs 0 ≤ tau_sigma_min ≤ tau_sigma_max")
        if self.pece and self.corrector_order == 0:
            raise ConfigError("solver.pece needs a corrector: set solver.corrector_order ≥ 1")

    def tau(self, sigma: float) -> float:
        return self.eta if self.tau_sigma_min <= sigma <= self.tau_sigma_max else 0.0

    def weights(self, nodes: list[float], lam_s: float, lam_t: float, tau: float, corrector: bool) -> list[float]:
        w = stochastic_adams_weights(nodes, lam_s, lam_t, tau**2)
        return _simple(w, nodes, lam_s, lam_t, tau, corrector) if self.simple_order_2 and len(nodes) == 2 else w

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        trail = state.stash.get(self, _Trail)
        pred = state.pred
        x, d, sigma = pred.x, pred.denoised, state.sigma
        left = state.schedule.steps - state.index  # N − i
        k = len(trail.ds)
        if k and self.corrector_order and (self.pece or state.sigma_next != 0):
            c = min(self.corrector_order, k + 1, left + 2 if self.lower_order_final else k + 1)
            nodes = [lam(sigma)] + trail.lams[::-1][: c - 1]
            w = self.weights(nodes, lam(trail.sigma), lam(sigma), trail.tau, corrector=True)
            h = lam(sigma) - lam(trail.sigma)
            x = (sigma / trail.sigma) * math.exp(-trail.tau**2 * h) * trail.x
            for wj, dj in zip(w, [d] + trail.ds[::-1][: c - 1]):
                x = x + wj * dj
            if trail.noise is not None:
                x = x + trail.noise
            if self.pece:
                d = denoise(x, sigma).denoised
        trail.lams.append(lam(sigma))
        trail.ds.append(d)
        keep = max(self.predictor_order, self.corrector_order)
        del trail.lams[:-keep], trail.ds[:-keep]
        if state.sigma_next == 0:
            return d
        p = min(self.predictor_order, k + 1, left if self.lower_order_final else k + 1)
        tau = self.tau(sigma)
        h = lam(state.sigma_next) - lam(sigma)
        w = self.weights(trail.lams[::-1][:p], lam(sigma), lam(state.sigma_next), tau, corrector=False)
        x_next = (state.sigma_next / sigma) * math.exp(-tau**2 * h) * x
        for wj, dj in zip(w, trail.ds[::-1][:p]):
            x_next = x_next + wj * dj
        noise = None
        if self.eta > 0 and self.s_noise > 0:
            noise = state.noise(sigma, state.sigma_next) * (state.sigma_next * noise_factor(tau**2 * h) * self.s_noise)
            x_next = x_next + noise
        trail.x, trail.sigma, trail.noise, trail.tau = x, sigma, noise, tau
        return x_next

    def step_from_infinity(self, state: SamplerState) -> torch.Tensor:
        """From σ = ∞ (the state is the unit noise ε) only the first-order step has a limit:
        x' = D + σ'·ε where τ(∞) = 0, D + σ'·s_noise·z otherwise. The multistep history starts
        after it."""
        d, t = state.pred.denoised, state.sigma_next
        if self.tau(math.inf) > 0 and self.s_noise > 0:
            return d + state.noise() * (t * self.s_noise)
        return d + t * state.pred.x
