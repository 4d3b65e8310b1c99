"""The optimisation view of sampling made literal: x is a parameter tensor, the probability-flow
direction d = (x − D)/σ its gradient, and a ``torch.optim`` optimizer takes each step with learning
rate lr·(σ_i − σ_{i+1}), so plain SGD at lr = 1 is the Euler step. ``optimizer=sgd`` with
``momentum`` β uses dampening β (buffer b = β·b + (1 − β)·d, b₀ = d₀): euler + heavy_ball(beta=β)
written as an optimizer; ``optimizer=adam`` (``betas``) takes Adam's normalised steps, whose length
no longer follows the ODE (a study object, not an ODE solver). Optimizer state lives per batch.
Score distillation, which drops the trajectory, is ``solver=distill``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from framework.plugin import Choice, ConfigError, hookimpl


class Optimizer(Choice):
    sgd = "sgd"
    adam = "adam"


@dataclass
class _Opt:
    param: torch.nn.Parameter
    opt: torch.optim.Optimizer


@dataclass
class TorchOptimizer:
    """The ``torch.optim`` options shared by ``optimize`` and ``distill``."""

    optimizer: Optimizer = Optimizer.sgd
    lr: float = 1.0
    momentum: float = 0.0  # sgd momentum (dampening = momentum)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"solver.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"solver.momentum must be in [0, 1), got {self.momentum}")

    def make(self, x: torch.Tensor) -> _Opt:
        """A parameter initialised to ``x`` and its optimizer."""
        param = torch.nn.Parameter(x.detach().clone())
        if self.optimizer == "sgd":
            opt = torch.optim.SGD([param], lr=self.lr, momentum=self.momentum, dampening=self.momentum)
        else:
            opt = torch.optim.Adam([param], lr=self.lr, betas=tuple(self.betas))  # type: ignore[arg-type]
        return _Opt(param, opt)


@dataclass
class Optimize(TorchOptimizer):
    @hookimpl
    def step(self, state, denoise):
        st = state.stash.get(self, lambda: self.make(state.x))
        st.param.data.copy_(state.x)  # guidance or churn may have moved x since the last step
        st.param.grad = state.pred.derivative.detach().clone()
        for group in st.opt.param_groups:
            group["lr"] = self.lr * (state.sigma - state.sigma_next)
        st.opt.step()
        return st.param.detach().clone()
