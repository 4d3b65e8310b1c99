"""The Fréchet distance between two Gaussians (the formula behind FID), in float64:
d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), with Tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(Σ₁Σ₂) (the eigenvalues of a
product of two PSD matrices are real and ≥ 0; round-off imaginary parts are dropped)."""
from __future__ import annotations

import torch


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] of samples ``x`` [N, ...] (flattened per sample)."""
    flat = x.reshape(x.shape[0], -1).double()
    if flat.shape[0] < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples")
    mean = flat.mean(0)
    centred = flat - mean
    return mean, centred.t().mm(centred) / (flat.shape[0] - 1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    root = torch.linalg.eigvals(cov1 @ cov2).real.clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * root)
