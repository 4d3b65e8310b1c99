"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes",
Algorithm 1): Heun steps (Karras et al. 2022) along the grid; once the grid reaches the σ closest to
``t_min``, the sample is sent back to ``t_max`` by fresh forward noise of std √(t_max² − t_min²)
and re-integrated back to t_min with ``restart_steps`` Heun steps on a Karras (ρ = 7) sub-grid;
this restart is repeated ``k`` times. The forward noise contracts the accumulated error; the
deterministic backward pass keeps the accuracy of the ODE. NFE: 2 per main step (1 on the last,
Euler onto D at σ = 0) plus 2·restart_steps·k. Not a fixed-order method (stochastic)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from framework.plugin import ConfigError, SamplerState, hookimpl


def heun(x: torch.Tensor, d: torch.Tensor, sigma: float, sigma_next: float, denoise) -> torch.Tensor:
    """One Heun step from (x, derivative d) at σ to σ_next > 0."""
    x_euler = x + (sigma_next - sigma) * d
    d_next = denoise(x_euler, sigma_next).derivative
    return x + (sigma_next - sigma) * (d + d_next) / 2


@dataclass
class Restart:
    t_min: float = 0.1
    t_max: float = 2.0
    restart_steps: int = 10
    k: int = 2
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.t_min < self.t_max:
            raise ConfigError(f"restart needs 0 < t_min < t_max, got {self.t_min} and {self.t_max}")
        if self.restart_steps < 1 or self.k < 0:
            raise ConfigError("restart needs restart_steps ≥ 1 and k ≥ 0")

    def _restart_index(self, sigmas: tuple[float, ...]) -> int:
        """The grid index whose σ (> 0) is closest to t_min: restarts happen on arriving there."""
        positive = [(abs(math.log(s / self.t_min)), i) for i, s in enumerate(sigmas) if s > 0]
        return min(positive)[1]

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.x - state.sigma * pred.derivative
        x = heun(pred.x, pred.derivative, state.sigma, state.sigma_next, denoise)
        low = state.sigma_next
        if state.index + 1 != self._restart_index(state.schedule.sigmas) or self.t_max <= low:
            return x
        a, b = self.t_max ** (1 / 7), low ** (1 / 7)
        sub = [float(s) for s in (a + np.linspace(0, 1, self.restart_steps + 1) * (b - a)) ** 7]
        sub[-1] = low
        for _ in range(self.k):
            x = x + state.noise() * (self.s_noise * math.sqrt(self.t_max**2 - low**2))
            for s, s_next in zip(sub, sub[1:]):
                x = heun(x, denoise(x, s).derivative, s, s_next, denoise)
        return x
