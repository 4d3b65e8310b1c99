"""Shared σ-space maths: the σ↔t map of discrete models and the ancestral split."""
from __future__ import annotations

import math

import numpy as np
import torch


def train_sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for each training timestep t (computed in the dtype diffusers uses)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_t(sigma: float, train_sigmas: np.ndarray) -> float:
    """Model time of a σ by linear interpolation in log σ between training timesteps.

    The fallback for σ values that carry no timestep (the same map as diffusers' ``_sigma_to_t``
    and k-diffusion's ``sigma_to_t``); clamped to [0, T−1].
    """
    log_sigmas = np.log(train_sigmas)
    log_sigma = math.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), 0, len(log_sigmas) - 2))
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = float(np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0))
    return (1 - w) * low + w * (low + 1)


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of an ancestral step σ → σ_next: a deterministic step to σ_down, then
    noise of std σ_up, so that σ_down² + σ_up² = σ_next².

    σ_up = min(σ_next, η·√(σ_next²(σ² − σ_next²)/σ²)); η = 1 is the DDPM posterior, η = 0 the
    ODE. In σ-space this is exactly DDIM's η (Song et al. 2021, eq. 16).
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


INIT_NOISE_MODES = ("sigma", "vp")


def init_noise_scale(sigma0: float, mode: str) -> float:
    """The initial noise scale: σ₀ (``sigma``, EDM/k-diffusion) or √(1 + σ₀²) (``vp``: diffusers'
    DDIM, and Euler/Heun with 'leading' spacing, start from unit-variance noise in VP space); 1 when
    σ₀ = ∞."""
    if math.isinf(sigma0):  # a grid from σ = ∞: the state there is the unit noise itself
        return 1.0
    if mode == "sigma":
        return sigma0
    if mode == "vp":
        return math.sqrt(1.0 + sigma0 * sigma0)
    raise ValueError(mode)


# ---------------------------------------------------------------------------------------------
# Helpers of the solver zoo (multistep weights, λ = −log σ, geometric midpoints)
# ---------------------------------------------------------------------------------------------
def lam(sigma: float) -> float:
    """λ = −log σ (half the log-SNR in σ-space); +inf at σ = 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


def geometric_mean(a: float, b: float) -> float:
    """√(a·b): the midpoint in log σ (DPM-Solver-2's and KDPM2's intermediate σ)."""
    return math.sqrt(a * b)


def lagrange_integral_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """w_j = ∫_a^b ℓ_j(s) ds for the Lagrange basis ℓ_j on ``nodes`` (exact polynomial integration).

    Σ_j w_j f(nodes_j) integrates the interpolating polynomial of f over [a, b]: the variable-step
    Adams–Bashforth (linear multistep) weights when the nodes are past σ values.
    """
    weights = []
    for j, nj in enumerate(nodes):
        poly = np.polynomial.Polynomial([1.0])
        for m, nm in enumerate(nodes):
            if m != j:
                poly = poly * np.polynomial.Polynomial([-nm, 1.0]) / (nj - nm)
        prim = poly.integ()
        weights.append(float(prim(b) - prim(a)))
    return weights


_GL_X, _GL_W = np.polynomial.legendre.leggauss(24)


def log_lagrange_integral_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """w_j = ∫_a^b ℓ_j(log s) ds, the Lagrange basis built on the log of ``nodes`` (all > 0) and
    integrated over s ∈ [a, b], a, b > 0 (DEIS' ρAB with log-ρ interpolation, as diffusers'
    ``solver_type="logrho"``). Gauss–Legendre in u = log s (24 nodes: exact to rounding for the
    smooth integrand ℓ_j(u)·eᵘ over one step)."""
    ua, ub = math.log(a), math.log(b)
    u = 0.5 * (ub - ua) * _GL_X + 0.5 * (ub + ua)
    jac = 0.5 * (ub - ua) * _GL_W * np.exp(u)
    logs = [math.log(n) for n in nodes]
    weights = []
    for j, lj in enumerate(logs):
        basis = np.ones_like(u)
        for m, lm in enumerate(logs):
            if m != j:
                basis = basis * (u - lm) / (lj - lm)
        weights.append(float((basis * jac).sum()))
    return weights


def loglinear_interp(sigmas: list[float], num: int) -> list[float]:
    """Resample a descending σ list to ``num`` points, linear in log σ over an equally spaced
    index (Align-Your-Steps' rule for other step counts; σ > 0)."""
    xs = np.linspace(0.0, 1.0, len(sigmas))
    ys = np.log(np.asarray(sigmas[::-1], dtype=np.float64))
    new = np.exp(np.interp(np.linspace(0.0, 1.0, num), xs, ys))
    return [float(s) for s in new[::-1]]


def sigma_at_time(t: float, train_sigmas: np.ndarray) -> float:
    """σ of a (fractional) model time t of a discrete model, linear in log σ between training
    timesteps (ComfyUI's ``ModelSamplingDiscrete.sigma``; the inverse of :func:`sigma_to_t`)."""
    log_sigmas = np.log(np.asarray(train_sigmas, dtype=np.float64))
    return float(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas)))


def sigma_range(model: object, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """(σ_min, σ_max) of a schedule: the configured values, else the model's; checked 0 < lo < hi."""
    from framework.core.errors import ConfigError

    lo = float(sigma_min) if sigma_min is not None else float(model.sigma_min)  # type: ignore[attr-defined]
    hi = float(sigma_max) if sigma_max is not None else float(model.sigma_max)  # type: ignore[attr-defined]
    if not 0 < lo < hi:
        raise ConfigError(f"needs 0 < sigma_min < sigma_max, got {lo} and {hi}")
    return lo, hi


def multistep_order(order: int, available: int, index: int, steps: int, to_zero: bool, lower_order_final: bool) -> int:
    """The order a multistep solver uses at step ``index`` of ``steps``: the warm-up
    min(order, available + 1) with ``available`` finished steps, first order on a step to σ = 0, and
    diffusers' ``lower_order_final`` (grids of < 15 steps: last step first order, the one before
    at most second)."""
    p = min(order, available + 1)
    if to_zero:
        return 1
    if lower_order_final and steps < 15:
        if index == steps - 1:
            return 1
        if index == steps - 2:
            return min(p, 2)
    return p


# ---------------------------------------------------------------------------------------------
# Flow matching (x_t = (1 − t)·x0 + t·ε) in σ-space: σ = t/(1 − t), y = x_t/(1 − t) = x0 + σ·ε
# ---------------------------------------------------------------------------------------------
def flow_sigma(t: float) -> float:
    """σ = t/(1 − t) of a flow model's time t ∈ [0, 1] (∞ at t = 1)."""
    return math.inf if t >= 1 else t / (1 - t)


def flow_time(sigma: float) -> float:
    """t = σ/(1 + σ) of a σ ≥ 0 (1 at σ = ∞)."""
    return 1.0 if math.isinf(sigma) else sigma / (1 + sigma)
