"""Gradient estimation, CFG++ form (Permenter & Yuan 2024, Algorithm 2, with Chung et al. 2024's
CFG++ re-noising; ComfyUI's ``gradient_estimation_cfg_pp``). With the unconditional noise estimate
d = (x − D_u)/σ and the previous step's d_prev:

    x' = D + σ'·d + (γ − 1)·(d − d_prev)·(σ' − σ)       (the first step without the last term),

and the step onto σ = 0 returns D. On an unconditional model (D_u = D) this is
``solver=euler momentum=[gradient_estimation] momentum.gradient_estimation.final=denoise`` exactly:
Euler along γ·d + (1 − γ)·d_prev. The plain form stays the momentum plugin
(plugins/momentum/gradient_estimation.py, docs/momentum.md); this CFG++ form is a solver because its
update needs the unconditional prediction (momentum plugins only change D). It requests the
unconditional pass and needs a CFG combiner (``guidance=[cfg]``) like ``euler_cfg_pp``. NFE 1 per
step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import ConfigError, SamplerState, hookimpl
from plugins.solver.euler_cfg_pp import CFGPP


@dataclass
class _Past:
    d: torch.Tensor | None = None


@dataclass
class GradientEstimationCFGPP(CFGPP):
    gamma: float = 2.0

    def __post_init__(self) -> None:
        if self.gamma <= 0:
            raise ConfigError(f"solver.gamma must be > 0 (the paper's γ = 2; 1 is euler_cfg_pp), got {self.gamma}")

    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        uncond = pred.denoised if pred.uncond_denoised is None else pred.uncond_denoised
        d = (pred.x - uncond) / state.sigma
        past = state.stash.get(self, _Past)
        if state.sigma_next == 0:
            x = pred.denoised
        else:
            x = pred.denoised + state.sigma_next * d
            if past.d is not None:
                x = x + (self.gamma - 1) * (state.sigma_next - state.sigma) * (d - past.d)
        past.d = d
        return x
