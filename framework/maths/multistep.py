"""Multistep weights on ε = d = (x − D)/σ, the probability-flow ODE's dx/dσ (PLMS, iPNDM, DEIS).

A multistep step is x' = x + Σ_j w_j·d_j over the derivatives of this step and the k − 1 before it,
newest first (:func:`recent_derivatives`, :func:`multistep_update`). The weights:

- :data:`AB` — Adams–Bashforth for equal steps (PLMS, iPNDM): w_j = (σ' − σ)·AB[k][j];
- :func:`ipndm_v_coefficients` — the variable-step iPNDM of diff-sampler (ComfyUI's ``ipndm_v``);
- :func:`deis_tab_weights` — DEIS' tAB (Zhang & Chen 2023): d interpolated by a polynomial in the VP
  time t(σ) (:class:`VPTime`) and integrated over σ, ComfyUI's ``deis`` (``deis_mode="tab"``).

The variable-step Adams–Bashforth of ``lms`` (a polynomial in σ) and the log-ρ DEIS of ``deis`` (a
polynomial in log σ) are :func:`framework.maths.sigmas.lagrange_integral_weights` and
:func:`framework.maths.sigmas.log_lagrange_integral_weights`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from framework.core.step import SamplerState

AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def recent_derivatives(state: SamplerState, k: int) -> tuple[list[float], list[torch.Tensor]]:
    """(σ, d) of this step's first evaluation and of the k − 1 finished steps before it, newest
    first: the σ where each evaluation was made (churn's σ̂ included) and d = (x − D)/σ."""
    past = state.history[len(state.history) - (k - 1) :] if k > 1 else []
    sigmas = [state.sigma] + [r.sigma for r in reversed(past)]
    ds = [state.pred.derivative] + [(r.x - r.direction) / r.sigma for r in reversed(past)]
    return sigmas, ds


def multistep_update(x: torch.Tensor, weights: Sequence[float], ds: Sequence[torch.Tensor]) -> torch.Tensor:
    """x + Σ_j w_j·d_j."""
    for w, d in zip(weights, ds):
        x = x + w * d
    return x


def fixed_adams_bashforth(state: SamplerState, max_order: int) -> torch.Tensor:
    """x + Δσ·Σ c_j ε_{i−j} with the uniform-step AB_k weights, k = min(i + 1, max_order)."""
    k = min(len(state.history) + 1, max_order)
    _, ds = recent_derivatives(state, k)
    dt = state.sigma_next - state.sigma
    return multistep_update(state.pred.x, [dt * c for c in AB[k]], ds)


def ipndm_v_coefficients(h: Sequence[float]) -> tuple[float, ...]:
    """c_j, newest first, of iPNDM's variable-step update x' = x + h₀·Σ_j c_j·d_j (the published
    ``ipndm_v`` of diff-sampler, zju-pi/diff-sampler ``ipndm_v_sampler``, which ComfyUI runs).

    ``h`` = (h₀, h₁, …, h_{k−1}): h₀ = σ' − σ this step, h_j = σ_{−j+1} − σ_{−j} the steps before
    (all negative on a descending grid); k = len(h) ∈ 1..4. With ratios r_j = h_{j−1}/h_j:

    - k = 2: c = (1 + r₁/2, −r₁/2) — the exact variable-step AB2;
    - k = 3: a = (1 − r₁²r₂/(3(1 + r₂)))/2, c = (1 + r₁/2 + a, −r₁/2 − (1 + r₂)·a, r₂·a);
    - k = 4: the k = 3 terms plus b·(1, −(1 + r₂ + q), r₂ + q·(1 + r₃), −q·r₂), q = h₁(h₁ + h₂)/(h₂(h₂ + h₃)),
      b = [(1 − h₀/(3S₁))/2 + (1 − h₀/(2S₁))·h₀/(6S₂)]·h₀S₁S₂/(h₁P₁P₂), S₁ = h₀ + h₁, S₂ = S₁ + h₂,
      P₁ = h₁ + h₂, P₂ = P₁ + h₃.

    On equal steps k ≤ 3 gives AB_k, but k = 4 gives (57, −65, 43, −11)/24, a third-order rule (AB4 is
    (55, −59, 37, −9)/24); on unequal steps k = 3 is exact only as the step ratios tend to 1, and the
    k = 4 weights sum to 1 + b·q·(r₃ − r₂), not 1. docs/solvers.md gives the measured orders.
    """
    k = len(h)
    if not 1 <= k <= 4:
        raise ValueError(f"ipndm_v has orders 1..4, got {k} steps")
    if k == 1:
        return (1.0,)
    r1 = h[0] / h[1]
    c = [1 + r1 / 2, -r1 / 2]
    if k == 2:
        return tuple(c)
    r2 = h[1] / h[2]
    a = (1 - r1 * r1 * r2 / (3 * (1 + r2))) / 2
    c = [c[0] + a, c[1] - (1 + r2) * a, r2 * a]
    if k == 3:
        return tuple(c)
    r3 = h[2] / h[3]
    s1, s2 = h[0] + h[1], h[0] + h[1] + h[2]
    p1, p2 = h[1] + h[2], h[1] + h[2] + h[3]
    q = h[1] * p1 / (h[2] * (h[2] + h[3]))
    b = ((1 - h[0] / (3 * s1)) / 2 + (1 - h[0] / (2 * s1)) * h[0] / (6 * s2)) * h[0] * s1 * s2 / (h[1] * p1 * p2)
    return (c[0] + b, c[1] - (1 + r2 + q) * b, c[2] + (r2 + q * (1 + r3)) * b, -q * r2 * b)


@dataclass(frozen=True)
class VPTime:
    """The VP-SDE time t(σ) of DEIS (Zhang & Chen 2023; Song et al. 2021's linear β):
    σ(t)² = exp(β_d·t²/2 + β_min·t) − 1, with β_d, β_min chosen so that t(``sigma_min``) = ``eps``
    and t(``sigma_max``) = 1 (EDM's VP mapping; ComfyUI's DEIS uses 0.002, 80, 1e-3 whatever the
    model)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    eps: float = 1e-3

    @property
    def betas(self) -> tuple[float, float]:
        """(β_d, β_min)."""
        top, bottom = math.log1p(self.sigma_max**2), math.log1p(self.sigma_min**2)
        beta_d = 2 * (bottom / self.eps - top) / (self.eps - 1)
        return beta_d, top - beta_d / 2

    def __call__(self, sigma: np.ndarray | float) -> np.ndarray:
        """t(σ) = (√(β_min² + 2β_d·log(1 + σ²)) − β_min)/β_d."""
        beta_d, beta_min = self.betas
        return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d

    def sigma_rate(self, t: np.ndarray) -> np.ndarray:
        """dσ/dt = (β_d·t + β_min)/(2√(ᾱ(1 − ᾱ))), ᾱ = 1/(1 + σ²) = exp(−β_d·t²/2 − β_min·t)."""
        beta_d, beta_min = self.betas
        alpha = np.exp(-0.5 * beta_d * t * t - beta_min * t)
        return 0.5 * (beta_d * t + beta_min) / np.sqrt(alpha * (1 - alpha))


_GL_X, _GL_W = np.polynomial.legendre.leggauss(32)


def lagrange_basis(x: np.ndarray, nodes: Sequence[float], j: int) -> np.ndarray:
    """ℓ_j(x) = Π_{m≠j} (x − nodes_m)/(nodes_j − nodes_m)."""
    out = np.ones_like(x)
    for m, nm in enumerate(nodes):
        if m != j:
            out = out * (x - nm) / (nodes[j] - nm)
    return out


def warped_lagrange_integral_weights(
    nodes: Sequence[float], a: float, b: float, warp: Callable[[np.ndarray], np.ndarray]
) -> list[float]:
    """w_j = ∫_a^b ℓ_j(warp(s)) ds, ℓ_j the Lagrange basis on warp(``nodes``) (all σ > 0, a, b > 0):
    the weights of a multistep method that interpolates d by a polynomial in warp(σ) and integrates
    it exactly over σ. Gauss–Legendre (32 nodes) in u = log s, where ℓ_j(warp(eᵘ))·eᵘ is smooth over
    one step (rounding-level accuracy on the grids used here)."""
    ua, ub = math.log(a), math.log(b)
    u = 0.5 * (ub - ua) * _GL_X + 0.5 * (ub + ua)
    jac = 0.5 * (ub - ua) * _GL_W * np.exp(u)
    tau, t_nodes = warp(np.exp(u)), [float(warp(np.float64(n))) for n in nodes]
    return [float((lagrange_basis(tau, t_nodes, j) * jac).sum()) for j in range(len(nodes))]


#: ComfyUI's quadrature of the tAB weights (comfy/k_diffusion/deis.py, after diff-sampler): this many
#: equally spaced τ, both ends included, each weighted Δτ/N.
RIEMANN_POINTS = 10_000


def deis_tab_weights(
    nodes: Sequence[float], sigma: float, sigma_next: float, time: VPTime, riemann: bool = False
) -> list[float]:
    """The tAB-DEIS weights (Zhang & Chen 2023: ε extrapolated by a Lagrange polynomial in the VP
    time t and integrated exactly against the exponential integrator's kernel, which is dσ/dτ in
    σ-space where the linear part vanishes): C_j = ∫_{t(σ)}^{t(σ')} (dσ/dτ)·ℓ_j(τ) dτ =
    ∫_σ^{σ'} ℓ_j(t(s)) ds, ℓ_j the Lagrange basis on the VP times of ``nodes`` (newest first).

    ``riemann=True`` computes the τ-integral as ComfyUI does, Σ_k (dσ/dτ)(τ_k)·ℓ_j(τ_k)·Δτ/N over
    N = :data:`RIEMANN_POINTS` equally spaced τ_k with both ends (an O(1/N) quadrature error)."""
    if not riemann:
        return warped_lagrange_integral_weights(nodes, sigma, sigma_next, time)
    t_nodes = [float(time(np.float64(n))) for n in nodes]
    t_next = float(time(np.float64(sigma_next)))
    tau = np.linspace(t_nodes[0], t_next, RIEMANN_POINTS)
    kernel = time.sigma_rate(tau) * (t_next - t_nodes[0]) / RIEMANN_POINTS
    return [float((kernel * lagrange_basis(tau, t_nodes, j)).sum()) for j in range(len(nodes))]


def euler_as_linear(sigmas: Sequence[float]) -> tuple[list[float], list[list[float]]]:
    """Euler (DDIM) on ``sigmas`` written as a linear multistep sampler in x_T and the denoiser
    outputs: x_{j+1} = e_j·x_T + Σ_{k≤j} b_jk·D_k (``solver=learned`` without coefficients; the start
    of ``method=learned``). A first σ of ∞ is the limit step x₁ = σ₁·x_T + D₀ from x_T = ε."""
    e: list[float] = []
    b: list[list[float]] = []
    ce, cb = 1.0, []  # the current state's coefficients
    for a, s in zip(sigmas, sigmas[1:]):
        if math.isinf(a):
            ce, cb = s * ce, [1.0]
        else:
            r = s / a
            ce, cb = r * ce, [r * v for v in cb] + [1.0 - r]
        e.append(ce)
        b.append(list(cb))
    return e, b


def linear_update(x_T: torch.Tensor, ds: Sequence[torch.Tensor], e: float | torch.Tensor,
                  b: Sequence[float | torch.Tensor], deltas: Sequence[torch.Tensor] = (),
                  g: Sequence[float | torch.Tensor] = ()) -> torch.Tensor:
    """e·x_T + Σ_k b_k·D_k (+ Σ_k g_k·Δ_k, the guidance differences Δ_k = D_cond − D_uncond, where given): the
    state after step len(ds) − 1 of a linear multistep sampler."""
    x = e * x_T
    for w, d in [*zip(b, ds), *zip(g, deltas)]:
        x = x + w * d
    return x
