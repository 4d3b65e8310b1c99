"""Score distillation as a solver, trajectory-free (SDS: Poole et al. 2023, "DreamFusion: Text-to-3D
using 2D Diffusion"; in latent space as in Metzer et al. 2023, "Latent-NeRF"). A latent z (started
from the run's unit noise, x_T / init_noise_scale) is optimised directly against the denoising
objective ½·w(σ)·‖z − sg(D(z + σ·ε, σ))‖²: at iteration i ``before_step`` re-noises z to the grid's
σ_i with fresh per-sample noise ε_i (the grid, high → low, is the annealing), the engine evaluates
the guided denoiser there (one NFE, CFG and loss guidance included), and a ``torch.optim``
optimizer (``optimizer``, ``lr``, ``momentum``, ``betas`` as in ``solver=optimize``) steps z along
g = w(σ_i)·(z − D), w(σ) = σ^``weight_power`` (0: x0-space, where SGD at lr = 1 is
z ← D(z + σε, σ); −1: DreamFusion's ε̂ − ε). A loss-guidance correction δ (``Prediction.shifted``)
enters as D + δ, so SGD at lr = 1 gives z ← D + δ. SDS is mode-seeking: see docs/momentum.md for
what it is good for and how it fails. Optimizer state lives per batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.plugin import ConfigError, hookimpl
from plugins.solver.optimize import TorchOptimizer


@dataclass
class Distill(TorchOptimizer):
    weight_power: float = 0.0

    @hookimpl
    def configure(self, run) -> None:
        me = run.plugins.name_of(self)
        others = [name for name, _ in run.plugins.calls("before_step") if name != me]
        if others:
            raise ConfigError(f"solver={me} re-noises the latent itself: remove the before-step plugins "
                              f"({', '.join(others)}), e.g. callback=[nan_guard]")
        starts = [name for name, _ in run.plugins.calls("init_latents")]
        if starts:
            raise ConfigError(f"solver={me} starts from unit noise, not from {', '.join(starts)}: "
                              "remove it or use solver=optimize")

    @hookimpl
    def before_step(self, state) -> None:
        z = state.x / state.schedule.init_noise_scale if state.is_first else state.x
        st = state.stash.get(self, lambda: self.make(z))
        st.param.data.copy_(z)
        # at σ = ∞ (a flow model's t = 1) the state is the unit noise itself, the limit of (z + σ·ε)/σ
        state.x = state.noise() if math.isinf(state.sigma) else z + state.sigma * state.noise()

    @hookimpl
    def step(self, state, denoise):
        st = state.stash.get(self, lambda: self.make(state.x))
        grad = st.param.detach() - state.pred.denoised.detach()
        if self.weight_power != 0:
            grad = grad * state.sigma**self.weight_power
        st.param.grad = grad
        st.opt.step()
        return st.param.detach().clone()
