"""DPM-Solver with adaptive step size (Lu et al. 2022, "DPM-Solver", §4.2 and Algorithm 5;
k-diffusion ``sample_dpm_adaptive``): an embedded pair of singlestep DPM-Solvers in
λ = −log σ on the noise estimate ε = (x − D)/σ — DPM-Solver-2 (r₁ = 1/3) and DPM-Solver-3
(r₁ = 1/3, r₂ = 2/3) sharing their stages (``order=3``, 3 NFE per try), or DPM-Solver-1 and -2
(``order=2``, 2 NFE per try). The step h is accepted when the error estimate
‖(x_low − x_high)/δ‖_rms ≤ 1, δ = max(atol, rtol·max(|x_low|, |x|)), and updated by
h ← h·clip(0.9·err^(−1/order), 0.2, 5). Each grid interval is integrated adaptively (the grid σ's
are output points; the step size carries over between intervals); the interval to σ = 0 is Euler
onto D. The error norm is the largest over the batch's finite samples, so samples of one batch
share their steps: results depend on the batch composition (not batch-invariant). A sample gone
NaN/Inf does not steer the step size (the NaN guard marks it failed); the others go on."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, hookimpl, lam


@dataclass
class _StepSize:
    h: float


@dataclass
class DPMAdaptive:
    order: int = 3
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    max_tries: int = 10000

    def __post_init__(self) -> None:
        if self.order not in (2, 3):
            raise ConfigError(f"solver.order must be 2 or 3, got {self.order}")
        if self.rtol <= 0 or self.atol <= 0 or self.h_init <= 0:
            raise ConfigError("dpm_adaptive needs rtol, atol, h_init > 0")

    def _pair(self, x, eps, t, h, denoise) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower-order, higher-order) solutions over [t, t + h] in λ."""
        sig = lambda tt: math.exp(-tt)  # noqa: E731
        s_next = sig(t + h)
        base = x - s_next * math.expm1(h) * eps
        if self.order == 2:
            s1 = sig(t + h / 2)
            eps1 = denoise(x - s1 * math.expm1(h / 2) * eps, s1).derivative
            return base, base - s_next * math.expm1(h) * (eps1 - eps)
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = sig(t + r1 * h), sig(t + r2 * h)
        eps1 = denoise(x - s1 * math.expm1(r1 * h) * eps, s1).derivative
        low = base - s_next / (2 * r1) * math.expm1(h) * (eps1 - eps)
        u2 = x - s2 * math.expm1(r2 * h) * eps - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps1 - eps)
        eps2 = denoise(u2, s2).derivative
        high = base - s_next / r2 * (math.expm1(h) / h - 1) * (eps2 - eps)
        return low, high

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        size = state.stash.get(self, lambda: _StepSize(self.h_init))
        t, t_end = lam(state.sigma), lam(state.sigma_next)
        x, eps = pred.x, pred.derivative
        for _ in range(self.max_tries):
            if t >= t_end - 1e-12 * max(1.0, abs(t_end)):
                return x
            last = size.h >= t_end - t
            h = t_end - t if last else size.h
            low, high = self._pair(x, eps, t, h, denoise)
            delta = torch.maximum(torch.full_like(x, self.atol), self.rtol * torch.maximum(low.abs(), x.abs()))
            per_sample = ((low - high) / delta).flatten(1).pow(2).mean(1).sqrt()
            finite = per_sample[torch.isfinite(per_sample)]
            err = float(finite.max()) if finite.numel() else 0.0  # all samples non-finite: nothing to control
            factor = min(5.0, max(0.2, 0.9 * (max(err, 1e-10) ** (-1 / self.order))))
            if err <= 1:
                t = t_end if last else t + h
                x = high
                if t < t_end:
                    eps = denoise(x, math.exp(-t)).derivative
                if not last:
                    size.h = h * factor
            else:
                size.h = h * factor
                if t + size.h == t:
                    raise RuntimeError(f"dpm_adaptive's step size underflowed at σ={math.exp(-t):.4g} (error estimate "
                                       f"{err:.3g} stays above 1): raise solver.rtol/solver.atol or use another solver")
        raise RuntimeError(f"dpm_adaptive did not reach σ={state.sigma_next:.4g} in {self.max_tries} tries")
