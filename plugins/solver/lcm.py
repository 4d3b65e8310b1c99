"""Latent consistency model sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3
"multistep latent consistency sampling"; diffusers' LCMScheduler, ComfyUI's ``lcm``): each step
jumps to the consistency estimate of x₀ and re-noises it to the next σ with fresh noise,

    x̂₀ = c_out(t)·D + c_skip(t)·x/√(1 + σ²),     x' = x̂₀ + s_noise·σ'·z   (the step onto σ = 0 returns x̂₀),

where D is the model's denoised estimate and c_skip = σ_d²/((s·t)² + σ_d²), c_out = s·t/√((s·t)² + σ_d²)
are LCM's boundary-condition scalings at the model timestep t (σ_d = 0.5, s = ``timestep_scaling``,
10 as in diffusers; x/√(1 + σ²) is diffusers' VP-frame sample). ``boundary=none`` uses x̂₀ = D, which is
ComfyUI's ``sample_lcm`` (there the scalings live in the model's sampling settings).

The scalings need the model's discrete timesteps: ``boundary=lcm`` on a continuous model (the analytic
ones) is a configuration error. Meant for LCM-distilled checkpoints and LCM-LoRAs at 2–8 steps; on a
model that is not consistency-distilled (its scheduler is not LCMScheduler/TCDScheduler) more than
``useful_steps`` steps draw a one-line warning (an LCM-LoRA on an ordinary checkpoint is recognised by nothing, so it
warns too above that count): each step discards the state but for x̂₀, so more steps
do not approach the ODE solution (they re-noise an ordinary model's blurry x̂₀ ever more often). Use the
LCM grid with ``schedule=custom`` (its timesteps) or ``solver=diffusers solver.scheduler=LCMScheduler``
for diffusers' exact run (tests/plugins/test_solvers_consistency.py). NFE 1 per step."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from framework.plugin import Choice, ConfigError, SamplerState, hookimpl, sigma_to_t

CONSISTENCY_SCHEDULERS = ("LCMScheduler", "TCDScheduler")
SIGMA_DATA = 0.5


class Boundary(Choice):
    """The consistency function's boundary condition: diffusers' LCM scalings, or none (ComfyUI)."""

    lcm = "lcm"
    none = "none"


def model_time(state: SamplerState, sigma: float) -> float:
    """The discrete model time of σ: the grid's, else log-σ interpolation of the training σ's."""
    t = state.schedule.timestep(sigma)
    return t if t is not None else sigma_to_t(sigma, np.asarray(state.run.model.train_sigmas, dtype=np.float64))


def is_consistency_model(model) -> bool:
    """Whether a diffusers model ships a consistency scheduler (LCM/TCD checkpoints do)."""
    scheduler = getattr(getattr(model, "pipe", None), "scheduler", None)
    return type(scheduler).__name__ in CONSISTENCY_SCHEDULERS


@dataclass
class LCM:
    boundary: Boundary = Boundary.lcm
    timestep_scaling: float = 10.0
    s_noise: float = 1.0
    useful_steps: int = 8

    @hookimpl
    def configure(self, run) -> None:
        if self.boundary == "lcm" and getattr(run.model, "train_sigmas", None) is None:
            raise ConfigError("solver=lcm with boundary=lcm needs a discrete-time model (LCM's c_skip/c_out scale its "
                              "timesteps): use solver.boundary=none on this model")
        if run.settings.steps > self.useful_steps and not is_consistency_model(run.model):
            warnings.warn(f"solver=lcm at steps={run.settings.steps} on a model that is not consistency-distilled: "
                          f"beyond {self.useful_steps} steps lcm re-noises the model's x0 estimate without approaching "
                          "the ODE solution; use an LCM checkpoint/LoRA or an ODE solver (e.g. solver=dpmpp_2m)",
                          stacklevel=2)

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        x0 = pred.denoised
        if self.boundary == "lcm":
            st = model_time(state, state.sigma) * self.timestep_scaling
            c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
            c_out = st / math.sqrt(st**2 + SIGMA_DATA**2)
            x0 = c_out * x0 + (c_skip / math.sqrt(1 + state.sigma**2)) * pred.x
        if state.sigma_next == 0:
            return x0
        return x0 + state.noise(state.sigma, state.sigma_next) * (state.sigma_next * self.s_noise)
