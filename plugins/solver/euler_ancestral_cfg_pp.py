"""Euler ancestral CFG++ (Chung et al. 2024, "CFG++"; ComfyUI's ``euler_ancestral_cfg_pp``, ε-model
form): step to σ_down from the guided estimate, re-noising along the unconditional noise estimate,
then add fresh noise of std σ_up (``ancestral_split``):

    x' = D + σ_down·(x − D_u)/σ + s_noise·σ_up·z,       the step onto σ = 0 returns D.

η = 0 is ``euler_cfg_pp``; on an unconditional model (D_u = D) it is ``euler_ancestral``. Like
``euler_cfg_pp`` it requests the unconditional pass itself and needs a CFG combiner in the guidance
list (``guidance=[cfg]``, a small ``cfg_scale``: CFG++'s λ ∈ [0, 1]). NFE 1 per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import Ancestral, SamplerState, hookimpl
from plugins.solver.euler_cfg_pp import CFGPP


@dataclass
class EulerAncestralCFGPP(Ancestral, CFGPP):
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        if state.sigma_next == 0:
            return pred.denoised
        uncond = pred.denoised if pred.uncond_denoised is None else pred.uncond_denoised
        down, up = self.split(state)
        x = pred.denoised + (down / state.sigma) * (pred.x - uncond)
        return self.renoise(state, x, up)
