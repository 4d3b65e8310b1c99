"""The optimisation view of sampling made literal, in two modes.

``mode=trajectory``: x is a parameter tensor, the probability-flow direction d = (x − D)/σ its
gradient, and a ``torch.optim`` optimizer takes each step with learning rate lr·(σ_i − σ_{i+1}) (so
plain SGD at lr = 1 is the Euler step). ``optimizer=sgd`` with ``momentum`` β uses dampening β
(buffer b = β·b + (1 − β)·d, b₀ = d₀): euler + heavy_ball(beta=β) written as an optimizer;
``optimizer=adam`` (``betas``) takes Adam's normalised steps, whose length no longer follows the ODE
(a study object, not an ODE solver).

``mode=distill``: trajectory-free, score-distillation style (SDS: Poole et al. 2023, "DreamFusion";
in latent space as in Metzer et al. 2023, "Latent-NeRF"). A latent z (started from the run's unit
noise, x_T / init_noise_scale) is optimised directly against the denoising objective
½·w(σ)·‖z − sg(D(z + σ·ε, σ))‖²: at iteration i the solver's ``before_step`` re-noises z to the
grid's σ_i with fresh per-sample noise ε_i (the grid, high → low, is the annealing), the engine
evaluates the guided denoiser there (one NFE, CFG and loss guidance included), and the optimizer
steps z along g = w(σ_i)·(z − D), w(σ) = σ^``weight_power`` (0: x0-space, where SGD at lr = 1 is
z ← D(z + σε, σ); −1: DreamFusion's ε̂ − ε), learning rate ``lr``. A loss-guidance correction δ
(``Prediction.shifted``) enters as D + δ, so SGD at lr = 1 gives z ← D + δ. SDS is mode-seeking:
see docs/momentum.md for what it is good for and how it fails. Optimizer state lives per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from framework.plugin import ConfigError, hookimpl


@dataclass
class _Opt:
    param: torch.nn.Parameter
    opt: torch.optim.Optimizer


@dataclass
class Optimize:
    mode: str = "trajectory"
    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_power: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("trajectory", "distill"):
            raise ConfigError(f"solver.mode must be trajectory or distill, got '{self.mode}'")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"solver.optimizer must be sgd or adam, got '{self.optimizer}'")
        if not self.lr > 0:
            raise ConfigError(f"solver.lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"solver.momentum must be in [0, 1), got {self.momentum}")
        if self.weight_power != 0 and self.mode != "distill":
            raise ConfigError("solver.weight_power weights the distillation gradient: set solver.mode=distill or drop it")

    def _make(self, x: torch.Tensor) -> _Opt:
        param = torch.nn.Parameter(x.detach().clone())
        if self.optimizer == "sgd":
            opt = torch.optim.SGD([param], lr=self.lr, momentum=self.momentum, dampening=self.momentum)
        else:
            opt = torch.optim.Adam([param], lr=self.lr, betas=tuple(self.betas))  # type: ignore[arg-type]
        return _Opt(param, opt)

    @hookimpl
    def configure(self, run) -> None:
        if self.mode != "distill":
            return
        others = [name for name, _ in run.plugins.calls("before_step") if name != run.plugins.name_of(self)]
        if others:
            raise ConfigError(f"solver=optimize solver.mode=distill re-noises the latent itself: remove the before-step "
                              f"plugins ({', '.join(others)}), e.g. callback=[nan_guard]")
        starts = [name for name, _ in run.plugins.calls("init_latents")]
        if starts:
            raise ConfigError(f"solver=optimize solver.mode=distill starts from unit noise, not from {', '.join(starts)}: "
                              "remove it or use solver.mode=trajectory")

    @hookimpl
    def before_step(self, state) -> None:
        if self.mode != "distill":
            return
        z = state.x / state.schedule.init_noise_scale if state.is_first else state.x
        st = state.stash.get(self, lambda: self._make(z))
        st.param.data.copy_(z)
        state.x = z + state.sigma * state.noise()

    @hookimpl
    def step(self, state, denoise):
        if self.mode == "distill":
            st = state.stash.get(self, lambda: self._make(state.x))
            grad = st.param.detach() - state.pred.denoised.detach()
            if self.weight_power != 0:
                grad = grad * state.sigma**self.weight_power
            st.param.grad = grad
        else:
            st = state.stash.get(self, lambda: self._make(state.x))
            st.param.data.copy_(state.x)  # guidance or churn may have moved x since the last step
            st.param.grad = state.pred.derivative.detach().clone()
            for group in st.opt.param_groups:
                group["lr"] = self.lr * (state.sigma - state.sigma_next)
        st.opt.step()
        return st.param.detach().clone()
