"""Generalised heavy ball, GHVB (Wizadwongsa et al., ICLR 2024, "Diffusion Sampling with Momentum
for Mitigating Divergence Artifacts"): heavy-ball momentum inside an order-k Adams–Bashforth method
on the derivative d = (x − D)/σ (PLMS-style, constant-step coefficients):

    v_i = beta·v_{i−1} + (1 − beta)·d_i,      step along  Σ_j c_j(b)·v_{i−j} / b,   b = 1 − beta,

with the paper's β-dependent coefficients c_j(b) (order 2: ((2 + b)·v_i − (2 − b)·v_{i−1})/2).
``beta`` is the weight of the past, the paper's β is 1 − beta. beta = 0 gives order-k
Adams–Bashforth (PLMS); order 1 is heavy ball; order 1 with beta = 0 is the base solver exactly.
Warm-up: step i uses min(i + 1, order) terms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from framework.plugin import ConfigError, MomentumPlugin, hookimpl

#: c_j(b) for orders 1–4, newest first, before division by the common denominator.
_COEFFS = {
    1: (lambda b: (b,), 1),
    2: (lambda b: (2 + b, -(2 - b)), 2),
    3: (lambda b: (18 + 5 * b, -(24 - 8 * b), 6 - b), 12),
    4: (lambda b: (46 + 9 * b, -(78 - 19 * b), 42 - 5 * b, -(10 - b)), 24),
}


@dataclass
class _State:
    v: torch.Tensor | None = None
    past: list[torch.Tensor] = field(default_factory=list)


@dataclass
class GHVB(MomentumPlugin):
    beta: float = 0.2
    order: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise ConfigError(f"ghvb.beta must be in [0, 1), got {self.beta}")
        if self.order not in _COEFFS:
            raise ConfigError(f"ghvb.order must be in 1..4, got {self.order}")

    @hookimpl
    def momentum(self, state, pred):
        mem = state.stash.get(self, _State)
        d = pred.derivative
        mem.v = d if mem.v is None else self.beta * mem.v + (1 - self.beta) * d
        mem.past = ([mem.v] + mem.past)[: self.order]
        if self.order == 1 and self.beta == 0:
            return pred
        b = 1 - self.beta
        coeffs, denom = _COEFFS[len(mem.past)]
        direction = sum(c * v for c, v in zip(coeffs(b), mem.past)) / (denom * b)
        return pred.with_denoised(pred.x - pred.sigma * direction)
