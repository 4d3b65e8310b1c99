"""Flow-matching models in σ-space: the arithmetic every flow adapter shares.

A flow model's forward process is x_t = (1 − t)·x0 + t·ε and its network predicts a velocity
v ≈ ε − x0. With σ = t/(1 − t) and y = x_t/(1 − t) = x0 + σ·ε (the sampler's state) the denoiser is

    D(y, σ) = x_in − t·v(x_in, t),   t = σ/(1 + σ),   x_in = y/(1 + σ) = x_t,

so every solver, schedule and guidance plugin works on flow models unchanged (the input scale
1/(1 + σ) plays the role of VP's 1/√(1 + σ²)). At σ = ∞ (t = 1, pure noise) the engine's state is
the unit noise ε itself, the network sees x_in = ε and D = ε − v(ε, 1); the engine takes the first
step in its limit form (:mod:`framework.core.engine`). The latent a pipeline decodes is
x_t = y/(1 + σ_last). Euler/DDIM steps are the same method in (x_t, t) and (y, σ); methods linear
in σ (Heun, LMS, iPNDM) are not the same as their t-space namesakes.
"""
from __future__ import annotations

import math

import torch

from framework.core.model import Model
from framework.maths.sigmas import flow_time


class FlowModel(Model):
    """Base of flow-matching adapters: implement :meth:`velocity` (one network call)."""

    def velocity(self, x_in: torch.Tensor, t: float, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's v(x_in, t) ≈ ε − x0 for a batch at flow time t ∈ (0, 1]."""
        raise NotImplementedError

    def denoise_batch(self, x, sigma, timestep, tensors):
        t = flow_time(sigma)
        x_in = x if math.isinf(sigma) else x / (1 + sigma)
        return x_in - t * self.velocity(x_in, t, tensors)

    native_space = "flow"

    def to_native(self, x, sigma, denoised):
        """The velocity v = (x_in − D)/t that gives D (the inverse of :meth:`denoise_batch`), also
        at σ = ∞ (t = 1, x_in = x)."""
        x_in = x if math.isinf(sigma) else x / (1 + sigma)
        return (x_in - denoised) / flow_time(sigma)

    def from_native(self, x, sigma, native):
        x_in = x if math.isinf(sigma) else x / (1 + sigma)
        return x_in - flow_time(sigma) * native

    def output_latents(self, x: torch.Tensor, sigma_last: float) -> torch.Tensor:
        return x if math.isinf(sigma_last) else x / (1 + sigma_last)  # at σ = ∞ the state is x_t (t = 1) itself
