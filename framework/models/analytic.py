"""Analytic denoisers with an exact D(x, σ), so sampler error can be measured exactly.

Both follow k-diffusion's denoiser protocol (``__call__(x, sigma)``, ``sigma_min``, ``sigma_max``,
``shape``) and provide ``exact_solution`` of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ, also
from σ = ∞ (where the state is the unit noise ε). ``parametrization: flow`` serves the same model
through a flow model's arithmetic (``framework.models.base.FlowTwin``): the same exact paths.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from framework.core.settings import Choice

#: Where the mixture's reference solve from σ = ∞ starts (the error of the start is O(1/σ), shrunk
#: by the flow to O(σ_end/σ²) at the end).
FROM_INFINITY = 1e6


class Parametrization(Choice):
    sigma = "sigma"  # the denoiser D(x, σ) itself
    flow = "flow"  # served as a flow model's velocity v(x_t, t) (framework.models.base.FlowTwin)


class Gaussian:
    """Data ~ N(mean, std²·I). D(x, σ) = mean + std²/(std² + σ²)·(x − mean); the ODE solution
    is x(σ) = mean + (x(σ₀) − mean)·√(std² + σ²)/√(std² + σ₀²)."""

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
        shape: Sequence[int] = (16,),
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        parametrization: str = "sigma",
    ):
        self.parametrization = Parametrization[parametrization]
        self.mean, self.std = float(mean), float(std)
        self.shape = tuple(int(s) for s in shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s2 = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) ** 2
        v = self.std**2
        return self.mean + v / (v + s2) * (x - self.mean)

    def exact_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        v = self.std**2
        if math.isinf(sigma_start):  # x_start is the unit noise: x(σ) = mean + ε·√(s² + σ²)
            return self.mean + x_start * math.sqrt(v + sigma_end**2)
        return self.mean + (x_start - self.mean) * math.sqrt(v + sigma_end**2) / math.sqrt(v + sigma_start**2)

    def sample_data(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        return self.mean + self.std * torch.randn((n, *self.shape), generator=generator, dtype=dtype)

    def data_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact (mean, covariance) of the data, flattened (float64): N(m, s²I)."""
        dim = math.prod(self.shape)
        return torch.full((dim,), self.mean, dtype=torch.float64), self.std**2 * torch.eye(dim, dtype=torch.float64)


class Mixture:
    """An isotropic Gaussian mixture: weights w_k, means μ_k, stds s_k (drawn from ``seed``).

    D(x, σ) = Σ_k r_k(x, σ)·(μ_k + s_k²/(s_k² + σ²)·(x − μ_k)), with responsibilities
    r_k ∝ w_k·N(x; μ_k, (s_k² + σ²)·I). ``exact_solution`` is a reference: an adaptive
    8th-order Runge–Kutta solve (scipy DOP853, rtol = atol = 1e-10) of the ODE in log σ.
    """

    def __init__(
        self,
        components: int = 4,
        shape: Sequence[int] = (8,),
        spread: float = 2.0,
        std: float = 0.5,
        seed: int = 0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        parametrization: str = "sigma",
    ):
        self.parametrization = Parametrization[parametrization]
        self.shape = tuple(int(s) for s in shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        rng = np.random.default_rng(seed)
        dim = int(np.prod(self.shape))
        self.means = torch.as_tensor(rng.normal(0.0, spread, size=(components, dim)))
        self.stds = torch.as_tensor(std * rng.uniform(0.5, 1.5, size=components))
        w = rng.uniform(0.5, 1.5, size=components)
        self.log_weights = torch.as_tensor(np.log(w / w.sum()))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        flat = x.reshape(b, 1, -1)
        dt = x.dtype
        mu, s2 = self.means.to(x.device, dt), (self.stds**2).to(x.device, dt)
        var = s2[None, :] + sigma.reshape(b, 1).to(dt) ** 2  # [b, K]
        dim = flat.shape[-1]
        sq = ((flat - mu[None]) ** 2).sum(-1)  # [b, K]
        logp = self.log_weights.to(x.device, dt)[None] - 0.5 * sq / var - 0.5 * dim * torch.log(var)
        r = torch.softmax(logp, dim=1)  # [b, K]
        post = mu[None] + (s2[None, :] / var)[..., None] * (flat - mu[None])  # [b, K, dim]
        return (r[..., None] * post).sum(1).reshape(x.shape)

    def exact_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        from scipy.integrate import solve_ivp

        shape, dtype, device = x_start.shape, x_start.dtype, x_start.device
        if math.isinf(sigma_start):  # from the unit noise ε: x(σ) = E[x0] + σ·ε + O(1/σ), started at σ = 1e6
            sigma_start = FROM_INFINITY
            x_start = self.data_moments()[0].reshape(shape[1:]) + sigma_start * x_start.detach().double().cpu()
        y0 = x_start.detach().double().cpu().reshape(-1).numpy()
        b = shape[0]
        end = max(sigma_end, 1e-6)

        def f(log_sigma: float, y: np.ndarray) -> np.ndarray:
            sigma = math.exp(log_sigma)
            x = torch.from_numpy(y).reshape(shape)
            d = self(x, torch.full((b,), sigma, dtype=torch.float64))
            return ((x - d)).reshape(-1).numpy()  # dx/dlogσ = σ·dx/dσ = x − D

        sol = solve_ivp(f, (math.log(sigma_start), math.log(end)), y0, method="DOP853", rtol=1e-10, atol=1e-10)
        x = torch.from_numpy(sol.y[:, -1]).reshape(shape)
        if sigma_end < end:  # from σ = 1e-6 to 0 the mixture's D is constant to ~1e-12
            x = self(x, torch.full((b,), end, dtype=torch.float64))
        return x.to(device=device, dtype=dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k, None] * eps
        return x.reshape(n, *self.shape).to(dtype)

    def data_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact (mean, covariance) of the data, flattened (float64): mean Σwₖμₖ and covariance
        Σwₖ(sₖ²I + μₖμₖᵀ) − μμᵀ."""
        w, mu, s2 = self.log_weights.exp(), self.means.double(), self.stds.double() ** 2
        mean = (w[:, None] * mu).sum(0)
        second = (w[:, None, None] * (mu[:, :, None] * mu[:, None, :])).sum(0) + (w * s2).sum() * torch.eye(
            mu.shape[1], dtype=torch.float64)
        return mean, second - mean[:, None] * mean[None, :]
