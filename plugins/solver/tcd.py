"""Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024,
"Trajectory Consistency Distillation", §4.3 and Algorithm 4; diffusers' TCDScheduler): from the
model's x₀ estimate D and noise estimate ε = (x − D)/σ, a DDIM jump to the intermediate level
s = ⌊(1 − γ)·t'⌋ (t' the next step's model timestep), then forward noise back up to σ':

    x_s = D + σ_s·ε,     x' = x_s + s_noise·√(σ'² − σ_s²)·z,

σ_s being the training σ of timestep s (in diffusers' VP frame: √(ᾱ'/ᾱ_s)·x_s + √(1 − ᾱ'/ᾱ_s)·z).
γ = 0 is deterministic DDIM, γ = 1 jumps to x₀ and re-noises fully each step (LCM's sampler). The last
step of a grid ending at σ(t = 0) (diffusers' TCD grid; ``schedule=custom``) takes no noise since s = 0
there; on a grid ending at σ = 0 the step onto 0 returns D.

γ ∈ (0, 1] needs the model's discrete timesteps (s is a training timestep): on a continuous model
(analytic ones) only γ = 0 runs, anything else is a configuration error. NFE 1 per step."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, hookimpl
from plugins.solver.lcm import model_time


@dataclass
class TCD:
    gamma: float = 0.3
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"solver.gamma must be in [0, 1] (TCD's γ; diffusers' eta), got {self.gamma}")

    @hookimpl
    def configure(self, run) -> None:
        if self.gamma > 0 and getattr(run.model, "train_sigmas", None) is None:
            raise ConfigError("solver=tcd with gamma > 0 needs a discrete-time model (γ picks the training timestep "
                              "⌊(1 − γ)·t'⌋): use a diffusers/bundled model, or solver.gamma=0 (DDIM) here")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        if self.gamma == 0:
            sigma_s = state.sigma_next
        else:
            s = math.floor((1 - self.gamma) * model_time(state, state.sigma_next))
            sigma_s = float(state.run.model.train_sigmas[s])
        x = pred.denoised + (sigma_s / state.sigma) * (pred.x - pred.denoised)
        up = math.sqrt(max(state.sigma_next**2 - sigma_s**2, 0.0))
        return x + state.noise(state.sigma, state.sigma_next) * (up * self.s_noise) if up > 0 else x
