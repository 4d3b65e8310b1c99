"""Heavy-ball (Polyak) momentum on the ODE direction d = (x − D)/σ (cf. Wizadwongsa et al. 2024):
v_i = beta·v_{i−1} + (1 − beta)·d_i, v_0 = d_0; the solver then steps along v (D ← x − σ·v).
With ``lookahead`` (the ``nesterov`` preset, the paper's "NT" variant) it steps along
beta·v_i + (1 − beta)·d_i instead.

``beta`` is the weight of the past: 0 is the base solver exactly. (In the GHVB paper's notation
β_paper = 1 − beta.) Composes with single-evaluation solvers that step along D: euler, ddim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, MomentumPlugin, hookimpl


@dataclass
class _Velocity:
    v: torch.Tensor | None = None


@dataclass
class HeavyBall(MomentumPlugin):
    beta: float = 0.5
    lookahead: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise ConfigError(f"momentum beta must be in [0, 1), got {self.beta}")

    @hookimpl
    def momentum(self, state, pred):
        mem = state.stash.get(self, _Velocity)
        d = pred.derivative
        if mem.v is None or self.beta == 0:
            mem.v = d
            return pred
        mem.v = self.beta * mem.v + (1 - self.beta) * d
        step = self.beta * mem.v + (1 - self.beta) * d if self.lookahead else mem.v
        return pred.with_denoised(pred.x - pred.sigma * step)
