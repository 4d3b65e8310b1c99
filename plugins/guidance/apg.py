"""Adaptive projected guidance, APG (Sadat et al. 2025, "Eliminating Oversaturation and Artifacts
of High Guidance Scales in Diffusion Models"), in x0-space: Δ = D_c − D_u, with momentum
Δ ← Δ + momentum·Δ_prev (the paper uses a negative value, e.g. −0.75), norm clipping
Δ ← Δ·min(1, norm_threshold/‖Δ‖) (per sample; 0 disables), then the split of Δ into its parts
parallel and orthogonal to D_c: D = D_c + (s − 1)·(Δ_⊥ + eta·Δ_∥). With eta = 1, no momentum and
no threshold this is plain CFG. s is the top-level ``cfg_scale``. Use instead of ``cfg``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import UncondGuidance, hookimpl


@dataclass
class _Running:
    delta: torch.Tensor | None = None


@dataclass
class APG(UncondGuidance):
    eta: float = 0.0
    momentum: float = -0.75
    norm_threshold: float = 0.0

    @hookimpl
    def guidance(self, state, pred):
        if pred.uncond_denoised is None:
            return pred
        cond = pred.cond_denoised
        delta = cond - pred.uncond_denoised
        if self.momentum:
            mem = state.stash.get(self, _Running)
            if mem.delta is not None:
                delta = delta + self.momentum * mem.delta
            mem.delta = delta
        dims = tuple(range(1, cond.ndim))
        if self.norm_threshold > 0:
            norm = delta.flatten(1).norm(dim=1).reshape(-1, *[1] * (cond.ndim - 1))
            delta = delta * torch.clamp(self.norm_threshold / norm, max=1.0)
        unit = cond / cond.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (cond.ndim - 1))
        parallel = (delta * unit).sum(dim=dims, keepdim=True) * unit
        orthogonal = delta - parallel
        return pred.with_denoised(cond + (state.run.settings.cfg_scale - 1) * (orthogonal + self.eta * parallel))
