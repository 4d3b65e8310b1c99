"""Reference solver for ground truth: each grid step solved by scipy's adaptive 8th-order
Dormand–Prince method (``solve_ivp(method="DOP853")``, Hairer et al.) on the probability-flow ODE
in log σ, dx/d log σ = x − D(x, σ), to tolerances ``rtol``/``atol`` (default 1e-10). A step to
σ = 0 is integrated to ``sigma_floor`` and finished with D there (the ODE's limit x(0) = D(x(σ), σ)
up to O(σ²)); with ``final: denoise`` it returns D at the grid's last nonzero σ instead, the final
step the fixed-step solvers take (for measuring their discretisation error alone). Every
right-hand side is one NFE. The tolerance applies to the whole batch as one
vector: samples of a batch share their steps (results are not bit-batch-invariant). Use float64.

From σ = ∞ (a flow model's t = 1, where the state is the unit noise ε) the step is integrated in the
flow coordinates, where the ODE is regular: z = x/(1 + σ), t = σ/(1 + σ), dz/dt = (z − D)/t, from
t = 1 (D(ε, ∞) there) to t₁ = σ₁/(1 + σ₁), returned as x₁ = (1 + σ₁)·z₁ — not the first-order
limit step the fixed-step solvers take there."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from framework.plugin import Choice, ConfigError, SamplerState, Throttle, hookimpl


class Final(Choice):
    integrate = "integrate"
    denoise = "denoise"


@dataclass
class Reference:
    rtol: float = 1e-10
    atol: float = 1e-10
    sigma_floor: float = 1e-6
    final: Final = Final.integrate

    def __post_init__(self) -> None:
        if self.rtol <= 0 or self.atol <= 0 or self.sigma_floor <= 0:
            raise ConfigError("reference needs rtol, atol, sigma_floor > 0")

    def _solve(self, rhs, span: tuple[float, float], x0: torch.Tensor) -> torch.Tensor:
        from scipy.integrate import solve_ivp

        sol = solve_ivp(rhs, span, x0.detach().double().cpu().reshape(-1).numpy(), method="DOP853",
                        rtol=self.rtol, atol=self.atol)
        if not sol.success:
            raise RuntimeError(f"reference solver failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1]).reshape(x0.shape).to(device=x0.device, dtype=x0.dtype)

    def _end(self, state: SamplerState) -> float:
        """The σ the integration ends at: the next grid σ, or ``sigma_floor`` on a step to 0."""
        return state.sigma_next if state.sigma_next > 0 else min(self.sigma_floor, state.sigma)

    def _finish(self, state: SamplerState, denoise, x: torch.Tensor, end: float) -> torch.Tensor:
        return denoise(x, end).denoised if state.sigma_next == 0 else x

    def _rhs(self, state: SamplerState, denoise, start: float, to_sigma, derivative, stop: float):
        """The right-hand side for solve_ivp: ``derivative(s, x, D)`` with x and σ from the
        integration variable s (``to_sigma(s, y)`` → (x, σ)); the step's own evaluation is reused at its start.
        A long integration reports how far it got (throttled lines: ``Throttle``)."""
        x0 = state.pred.x
        nfe, reached, clock = 0, 0.0, Throttle()

        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            nonlocal nfe, reached
            x, sigma = to_sigma(s, torch.from_numpy(y).reshape(x0.shape).to(device=x0.device, dtype=x0.dtype))
            pred = state.pred if s == start and torch.equal(x, x0) else denoise(x, sigma)
            nfe += pred is not state.pred
            reached = max(reached, (s - start) / (stop - start))
            clock.maybe(lambda: f"reference: step from σ {state.sigma:.4g} to {state.sigma_next:.4g}, "
                                f"{reached:.0%} of the way (in the integration variable), {nfe} NFE")
            return derivative(s, x, pred.denoised).double().cpu().reshape(-1).numpy()

        return rhs

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        if state.sigma_next == 0 and self.final == "denoise":
            return state.pred.denoised
        end, x = self._end(state), state.pred.x
        if end < state.sigma:
            start = math.log(state.sigma)
            rhs = self._rhs(state, denoise, start, lambda s, x: (x, math.exp(s)), lambda s, x, d: x - d, math.log(end))
            x = self._solve(rhs, (start, math.log(end)), x)
        return self._finish(state, denoise, x, end)

    def step_from_infinity(self, state: SamplerState) -> torch.Tensor:
        if state.sigma_next == 0 and self.final == "denoise":
            return state.pred.denoised
        end = self._end(state)  # in t: z(1) = ε, x = z/(1 − t), σ = t/(1 − t); at t = 1 the evaluation at ∞
        to_sigma = (lambda t, z: (z, math.inf) if t == 1.0 else (z / (1 - t), t / (1 - t)))
        rhs = self._rhs(state, state.denoise, 1.0, to_sigma, lambda t, x, d: (x * (1 - t) - d) / t if t < 1.0 else x - d,
                        end / (1 + end))
        z = self._solve(rhs, (1.0, end / (1 + end)), state.pred.x)
        return self._finish(state, state.denoise, z * (1 + end), end)
