"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
Models", arXiv 2503.18886): CFG with an optimised scale on the unconditional prediction and
zero-init of the first steps.

Optimised scale, per sample: s* = ⟨p_c, p_u⟩/(‖p_u‖² + 1e-8), then p = s*·p_u + w·(p_c − s*·p_u)
(w the top-level ``cfg_scale``; diffusers' ClassifierFreeZeroStarGuidance). Zero-init (§4.2): the
first ``zero_init_steps`` steps predict p = 0 — in the native space of a flow model (v = 0) or an
ε-model (ε = 0) the step leaves x_t where it is; with ``space=denoised`` p = 0 is D = 0.

Space: ``native`` by default (the model's raw output, where diffusers applies it), ``denoised``
(x0-space) as an option; the projection and the zero-init make the two differ. ``start``/``stop``:
the guidance window as fractions of the run (outside it p = p_c; the zero-init still applies).
Use instead of ``cfg``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, NativeGuidance, flat_dot


@dataclass
class CFGZeroStar(NativeGuidance):
    zero_init_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_init_steps < 0:
            raise ConfigError(f"cfg_zero_star.zero_init_steps must be ≥ 0 (steps predicted as zero), "
                              f"got {self.zero_init_steps}")

    def guide(self, state, cond, uncond):
        if state.index < self.zero_init_steps:
            return torch.zeros_like(cond)
        return super().guide(state, cond, uncond)

    def combine(self, state, cond, uncond):
        wide = torch.promote_types(cond.dtype, torch.float32)  # diffusers' float32, or the run's float64
        c, u = cond.to(wide), uncond.to(wide)
        alpha = (flat_dot(c, u) / (flat_dot(u, u) + 1e-8)).to(cond.dtype)
        uncond = alpha * uncond
        return uncond + state.run.settings.cfg_scale * (cond - uncond)
