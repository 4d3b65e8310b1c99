"""DPM-Solver++(2M) CFG++ (Chung et al. 2024, the multistep form used by k-diffusion/ComfyUI): the
data-prediction exponential integrator in λ = −log σ stepping to the guided estimate while the
re-noising part uses the unconditional estimate,

    x' = D + e^(−h)·(x − D_u) − expm1(−h)·(D − D_u,prev)/(2r)      (h = λ' − λ, r = h_prev/h),

first order on the first step and on the step to σ = 0. Like ``euler_cfg_pp``, on a text-conditioned
model it requests the unconditional pass itself and needs a CFG combiner in the guidance list; on an
unconditional model (D_u = D) it is DPM-Solver++(2M) exactly in exact arithmetic."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framework.plugin import hookimpl, lam
from plugins.solver.euler_cfg_pp import CFGPP


@dataclass
class _Prev:
    uncond: torch.Tensor | None = None
    sigma: float = 0.0


@dataclass
class DPMPP2MCFGPP(CFGPP):
    @hookimpl
    def step(self, state, denoise):
        pred = state.pred
        uncond = pred.denoised if pred.uncond_denoised is None else pred.uncond_denoised
        prev = state.stash.get(self, _Prev)
        if state.sigma_next == 0:
            x = pred.denoised
        else:
            h = lam(state.sigma_next) - lam(state.sigma)
            x = pred.denoised + math.exp(-h) * (pred.x - uncond)
            if prev.uncond is not None:
                r = (lam(state.sigma) - lam(prev.sigma)) / h
                x = x - math.expm1(-h) / (2 * r) * (pred.denoised - prev.uncond)
        prev.uncond, prev.sigma = uncond, state.sigma
        return x
