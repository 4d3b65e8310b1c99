"""DPM-Solver-fast (Lu et al. 2022, "DPM-Solver", §3.4 "DPM-Solver-fast"; k-diffusion's
``sample_dpm_fast``, ComfyUI's ``dpm_fast``): singlestep DPM-Solver-1/2/3 in the noise-prediction
form ε = (x − D)/σ on a grid uniform in λ = −log σ, the orders chosen by the evaluation budget.

It owns the schedule role, as ``solver=diffusers`` does, because the grid is part of the method:
the run's ``steps`` is the NFE budget n; the grid has K = ⌊n/3⌋ + 1 intervals uniform in λ from
σ_max to σ_min, and their orders are 3, …, 3, 2, 1 when 3 | n, else 3, …, 3, (n mod 3) — so the
NFE is exactly n (the engine counts it). σ_max and σ_min are the model's range unless
``solver.sigma_max`` / ``solver.sigma_min`` are given (ComfyUI passes the largest and the smallest
nonzero σ of its scheduler's grid: set them to replay a ComfyUI run). The grid ends at σ_min, not 0:
the result is x there, as k-diffusion returns it (the model's output_latents maps it as for any grid
ending above 0). The initial noise is σ_max·z. The orders are counted from the end of the grid, so a
plugin that cuts its first steps (img2img) keeps the final 2, 1.

Steps (h = λ' − λ): order 1 x' = x − σ'·expm1(h)·ε; order 2 (r₁ = 1/2) and order 3 (r₁ = 1/3,
r₂ = 2/3) as DPM-Solver-2/3 (the paper's Algorithms 4 and 5). With ``eta`` > 0 each step goes to
σ_down (``ancestral_split``, at least σ_min) and adds noise of std √(σ'² − σ_down²)·s_noise
(k-diffusion's ancestral form); η = 0 (default) is the ODE solver of the paper."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, Schedule, ancestral_split, hookimpl, lam


def budget_orders(nfe: int) -> list[int]:
    """The orders of DPM-Solver-fast's K = ⌊nfe/3⌋ + 1 steps (they sum to nfe)."""
    k = nfe // 3 + 1
    return [3] * (k - 2) + [2, 1] if nfe % 3 == 0 else [3] * (k - 1) + [nfe % 3]


@dataclass
class DPMFast:
    sigma_min: float | None = None
    sigma_max: float | None = None
    eta: float = 0.0
    s_noise: float = 1.0

    owns_schedule = True

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ConfigError(f"solver.eta must be ≥ 0, got {self.eta}")
        for name in ("sigma_min", "sigma_max"):
            v = getattr(self, name)
            if v is not None and not (0 < v < math.inf):
                raise ConfigError(f"solver.{name} must be a positive finite σ (or null: the model's), got {v}")

    @hookimpl
    def schedule(self, model, steps: int) -> Schedule:
        if steps < 2:
            raise ConfigError("solver=dpm_fast: steps is its NFE budget and must be at least 2")
        lo = self.sigma_min if self.sigma_min is not None else float(model.sigma_min)
        hi = self.sigma_max if self.sigma_max is not None else float(model.sigma_max)
        if not lo < hi:
            raise ConfigError(f"solver=dpm_fast needs sigma_min < sigma_max, got {lo} and {hi}")
        k = len(budget_orders(steps))
        a, b = lam(hi), lam(lo)
        sig = tuple([hi] + [math.exp(-(a + (b - a) * j / k)) for j in range(1, k)] + [lo])
        return Schedule(sig, None, hi)

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        run_orders = budget_orders(state.run.settings.steps)
        order = run_orders[len(run_orders) - (state.schedule.steps - state.index)]
        pred = state.pred
        target, up = state.sigma_next, 0.0
        if self.eta > 0:
            down, _ = ancestral_split(state.sigma, state.sigma_next, self.eta)
            target = max(down, state.schedule.sigmas[-1])
            up = math.sqrt(max(state.sigma_next**2 - target**2, 0.0))
        x = self._solve(pred.x, pred.derivative, state.sigma, target, order, denoise)
        return x + state.noise(state.sigma, state.sigma_next) * (up * self.s_noise) if up > 0 else x

    @staticmethod
    def _solve(x, eps, sigma, sigma_next, order, denoise) -> torch.Tensor:
        t, h = lam(sigma), lam(sigma_next) - lam(sigma)
        sig = lambda u: math.exp(-u)  # noqa: E731
        base = x - sigma_next * math.expm1(h) * eps
        if order == 1:
            return base
        if order == 2:
            s1 = sig(t + h / 2)
            eps1 = denoise(x - s1 * math.expm1(h / 2) * eps, s1).derivative
            return base - sigma_next * math.expm1(h) * (eps1 - eps)
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = sig(t + r1 * h), sig(t + r2 * h)
        eps1 = denoise(x - s1 * math.expm1(r1 * h) * eps, s1).derivative
        u2 = x - s2 * math.expm1(r2 * h) * eps - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps1 - eps)
        eps2 = denoise(u2, s2).derivative
        return base - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps2 - eps)
