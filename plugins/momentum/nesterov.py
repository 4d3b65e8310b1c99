"""Nesterov momentum on the derivative d = (x − D)/σ (the "NT" variant of Wizadwongsa et al. 2024):
v_i = beta·v_{i−1} + (1 − beta)·d_i (v_0 = d_0) and the step goes along beta·v_i + (1 − beta)·d_i,
a look-ahead of heavy-ball. ``beta`` is the weight of the past: 0 is the base solver exactly
(the paper's β is 1 − beta)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework import hookimpl
from framework.errors import ConfigError
from framework.momentum import MomentumPlugin


@dataclass
class _Velocity:
    v: torch.Tensor | None = None


@dataclass
class Nesterov(MomentumPlugin):
    beta: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise ConfigError(f"nesterov.beta must be in [0, 1), got {self.beta}")

    @hookimpl
    def momentum(self, state, pred):
        mem = state.stash.get(self, _Velocity)
        d = pred.derivative
        if mem.v is None or self.beta == 0:
            mem.v = d
            return pred
        mem.v = self.beta * mem.v + (1 - self.beta) * d
        return pred.with_denoised(pred.x - pred.sigma * (self.beta * mem.v + (1 - self.beta) * d))
