"""MAMBO-G, magnitude-aware guidance ("Magnitude-Aware Mitigation for Boosted Guidance",
arXiv 2508.03442): the guidance scale shrinks where the guidance update is large relative to the
unconditional prediction.

Per sample, r = ‖p_c − p_u‖/‖p_u‖ (norms over all dims but the batch's), the scale
w' = 1 + (w − 1)·exp(−α·r), and p = p_u + w'·(p_c − p_u), with w the top-level ``cfg_scale``
and α = ``alpha`` (diffusers' MagnitudeAwareGuidance, which in diffusers 0.42 fails on 4-D
tensors: torch.norm over three dims; the parity test flattens the predictions to [B, n], where the
formula is the same).

Space: ``native`` by default (the model's output, where diffusers applies it), ``denoised`` as an
option; r is a ratio of norms, so the two differ. ``start``/``stop``: the guidance window as
fractions of the run. Use instead of ``cfg``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, NativeGuidance


@dataclass
class MamboG(NativeGuidance):
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0:
            raise ConfigError(f"mambo_g.alpha must be ≥ 0 (0 is plain CFG), got {self.alpha}")

    def combine(self, state, cond, uncond):
        shape = (-1, *[1] * (cond.ndim - 1))
        diff = cond - uncond
        ratio = diff.flatten(1).norm(dim=1) / uncond.flatten(1).norm(dim=1)
        scale = 1 + (state.run.settings.cfg_scale - 1) * torch.exp(-self.alpha * ratio)
        return uncond + scale.reshape(shape) * diff
