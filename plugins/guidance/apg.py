"""Adaptive projected guidance, APG (Sadat et al. 2025, "Eliminating Oversaturation and Artifacts
of High Guidance Scales in Diffusion Models"), in x0-space by default (the paper's choice):
Δ = D_c − D_u, with momentum Δ ← Δ + momentum·Δ_prev (the paper uses a negative value, e.g. −0.75),
norm clipping Δ ← Δ·min(1, norm_threshold/‖Δ‖) (per sample; 0 disables), then the split of Δ into
its parts parallel and orthogonal to D_c: D = D_c + (s − 1)·(Δ_⊥ + eta·Δ_∥). With eta = 1, no
momentum and no threshold this is plain CFG. s is the top-level ``cfg_scale``. ``space=native``
applies the same to the model's output (ε, v, velocity); ``start``/``stop`` are a guidance window
as fractions of the run (outside it the conditional prediction). Use instead of ``cfg``.

``apg_mix`` (:class:`APGMix`) is diffusers' AdaptiveProjectedMixGuidance (HunyuanImage 2.1): plain
CFG, p = p_u + s·Δ with s the top-level ``cfg_scale``, at steps i ≤ ``apg_start_step`` (their
momentum buffer filled all the same), then APG with its own scale, p = p_u + apg_scale·(Δ_⊥ + eta·Δ_∥)
(diffusers' formulation, from p_u), Δ with momentum and clipped at ``norm_threshold``. Native space
by default (where diffusers applies it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, NativeGuidance, PredictionSpace, split_parallel


@dataclass
class _Running:
    delta: torch.Tensor | None = None


def clip_norm(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Δ·min(1, threshold/‖Δ‖) per sample (``threshold`` 0: Δ)."""
    if threshold <= 0:
        return delta
    norm = delta.flatten(1).norm(dim=1).reshape(-1, *[1] * (delta.ndim - 1))
    return delta * torch.clamp(threshold / norm, max=1.0)


@dataclass
class APG(NativeGuidance):
    space: PredictionSpace = PredictionSpace.denoised
    eta: float = 0.0
    momentum: float = -0.75
    norm_threshold: float = 0.0

    def running(self, state, delta: torch.Tensor) -> torch.Tensor:
        """Δ + momentum·(the previous running Δ), stored as the new running Δ (per batch)."""
        if not self.momentum:
            return delta
        mem = state.stash.get(self, _Running)
        if mem.delta is not None:
            delta = delta + self.momentum * mem.delta
        mem.delta = delta
        return delta

    def projected(self, state, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Δ_⊥ + eta·Δ_∥ of the running, clipped Δ, split along ``cond``."""
        delta = clip_norm(self.running(state, cond - uncond), self.norm_threshold)
        parallel, orthogonal = split_parallel(delta, cond)
        return orthogonal + self.eta * parallel

    def combine(self, state, cond, uncond):
        return cond + (state.run.settings.cfg_scale - 1) * self.projected(state, cond, uncond)


@dataclass
class APGMix(APG):
    space: PredictionSpace = PredictionSpace.native
    momentum: float = -0.5
    norm_threshold: float = 10.0
    apg_scale: float = 10.0
    apg_start_step: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.apg_start_step < -1:
            raise ConfigError(f"apg_mix.apg_start_step must be ≥ -1 (APG from the step after it), "
                              f"got {self.apg_start_step}")

    def combine(self, state, cond, uncond):
        if state.index <= self.apg_start_step:
            self.running(state, cond - uncond)  # the momentum buffer is filled during the CFG steps
            return uncond + state.run.settings.cfg_scale * (cond - uncond)
        return uncond + self.apg_scale * self.projected(state, cond, uncond)
