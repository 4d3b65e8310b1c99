"""Reference solver for ground truth: each grid step solved by scipy's adaptive 8th-order
Dormand–Prince method (``solve_ivp(method="DOP853")``, Hairer et al.) on the probability-flow ODE
in log σ, dx/d log σ = x − D(x, σ), to tolerances ``rtol``/``atol`` (default 1e-10). A step to
σ = 0 is integrated to ``sigma_floor`` and finished with D there (the ODE's limit x(0) = D(x(σ), σ)
up to O(σ²)); with ``final: denoise`` it returns D at the grid's last nonzero σ instead, the final
step the fixed-step solvers take (for measuring their discretisation error alone). Every
right-hand side is one NFE. The tolerance applies to the whole batch as one
vector: samples of a batch share their steps (results are not bit-batch-invariant). Use float64."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from framework.plugin import Choice, ConfigError, SamplerState, hookimpl


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

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        from scipy.integrate import solve_ivp

        x0 = state.pred.x
        if state.sigma_next == 0 and self.final == "denoise":
            return state.pred.denoised
        shape, dtype, device = x0.shape, x0.dtype, x0.device
        end = state.sigma_next if state.sigma_next > 0 else min(self.sigma_floor, state.sigma)

        start = math.log(state.sigma)

        def rhs(log_sigma: float, y: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)
            at_start = log_sigma == start and torch.equal(x, x0)
            pred = state.pred if at_start else denoise(x, math.exp(log_sigma))
            return (x - pred.denoised).double().cpu().reshape(-1).numpy()

        x = x0
        if end < state.sigma:
            y0 = x0.detach().double().cpu().reshape(-1).numpy()
            sol = solve_ivp(rhs, (start, math.log(end)), y0, method="DOP853",
                            rtol=self.rtol, atol=self.atol)
            if not sol.success:
                raise RuntimeError(f"reference solver failed: {sol.message}")
            x = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device=device, dtype=dtype)
        if state.sigma_next == 0:
            return denoise(x, end).denoised
        return x
