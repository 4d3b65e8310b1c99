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
    DDIM, and Euler/Heun with 'leading' spacing, start from unit-variance noise in VP space)."""
    if mode == "sigma":
        return sigma0
    if mode == "vp":
        return math.sqrt(1.0 + sigma0 * sigma0)
    raise ValueError(mode)
