"""Adam-style adaptive normalisation of the update direction (cf. Kingma & Ba 2015), on the
derivative d = (x − D)/σ, keeping the plain step's per-element length:

    m_i = beta·m_{i−1} + (1 − beta)·d_i,        v_i = beta2·v_{i−1} + (1 − beta2)·d_i²
    m̂ = m_i/(1 − beta^(i+1)),  v̂ = v_i/(1 − beta2^(i+1))              (bias correction)
    u_i = m̂ ⊙ √((d_i² + eps)/(v̂ + eps))                                (the step goes along u)

i.e. Adam's direction m̂/√v̂ rescaled by the current |d_i|, so the ODE's step size is kept while
elements whose history is larger than their present are damped. ``beta`` and ``beta2`` are weights
of the past: beta = beta2 = 0 is the base solver exactly. ``rmsprop`` is this plugin with beta = 0
(normalisation only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, MomentumPlugin, hookimpl


@dataclass
class _Moments:
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    t: int = 0


@dataclass
class Adam(MomentumPlugin):
    beta: float = 0.5
    beta2: float = 0.9
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("beta", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"adam.{name} must be in [0, 1), got {getattr(self, name)}")

    @hookimpl
    def momentum(self, state, pred):
        if self.beta == 0 and self.beta2 == 0:
            return pred
        mem = state.stash.get(self, _Moments)
        d = pred.derivative
        sq = d * d
        mem.t += 1
        mem.m = (1 - self.beta) * d if mem.m is None else self.beta * mem.m + (1 - self.beta) * d
        mem.v = (1 - self.beta2) * sq if mem.v is None else self.beta2 * mem.v + (1 - self.beta2) * sq
        m_hat = mem.m / (1 - self.beta**mem.t)
        v_hat = mem.v / (1 - self.beta2**mem.t)
        u = m_hat * torch.sqrt((sq + self.eps) / (v_hat + self.eps))
        return pred.with_denoised(pred.x - pred.sigma * u)
