"""DPM-Solver++(2S) ancestral CFG++ (Chung et al. 2024, "CFG++"; ComfyUI's
``dpmpp_2s_ancestral_cfg_pp``, ε-model form as in its current ``comfy/k_diffusion/sampling.py``).
The two-stage DPM-Solver++(2S) step to σ_down (Lu et al. 2022b, Algorithm 1, r = 1/2) is taken with
the *unconditional* estimates only, and the guidance vector g = D − D_u of the step's first
evaluation is added at the end (h = λ(σ_down) − λ(σ), λ = −log σ, σ_s = √(σ·σ_down)):

    x_s = (σ_s/σ)·x − expm1(−h/2)·D_u,     D_u,s = the unconditional part of D(x_s, σ_s),
    x'  = (σ_down/σ)·x − expm1(−h)·D_u,s + s_noise·σ_up·z + g.

When σ_down = 0 the step is Euler onto D_u (+ g = D). η = 0 is the deterministic form; on an
unconditional model (D_u = D, g = 0) it is ``dpmpp_2s_ancestral`` exactly. It requests the
unconditional pass and needs a CFG combiner (``guidance=[cfg]``) like ``euler_cfg_pp``.
NFE 2 per step (1 on the last)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import Ancestral, SamplerState, geometric_mean, hookimpl, lam
from plugins.solver.euler_cfg_pp import CFGPP


def _uncond(pred) -> torch.Tensor:
    return pred.denoised if pred.uncond_denoised is None else pred.uncond_denoised


@dataclass
class DPMPP2SAncestralCFGPP(Ancestral, CFGPP):
    @hookimpl
    def step(self, state: SamplerState, denoise) -> torch.Tensor:
        pred = state.pred
        uncond = _uncond(pred)
        down, up = self.split(state)
        if down == 0:
            x = uncond
        else:
            h = lam(down) - lam(state.sigma)
            mid = geometric_mean(state.sigma, down)
            x_mid = (mid / state.sigma) * pred.x - math.expm1(-h / 2) * uncond
            uncond_mid = _uncond(denoise(x_mid, mid))
            x = (down / state.sigma) * pred.x - math.expm1(-h) * uncond_mid
        return self.renoise(state, x, up) + (pred.denoised - uncond)
