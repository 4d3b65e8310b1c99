"""Euler CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance"): step to
the guided estimate but re-noise with the unconditional noise estimate,
x' = D_guided + σ'·(x − D_uncond)/σ. Use with a small guidance scale (the paper's λ ∈ [0, 1], e.g.
``cfg_scale=0.6``). Without an unconditional pass it is the Euler step exactly."""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import hookimpl


@dataclass
class EulerCFGPP:
    @hookimpl
    def step(self, state, denoise):
        pred = state.pred
        if pred.uncond_denoised is None:
            return pred.x + (state.sigma_next - state.sigma) * pred.derivative
        return pred.denoised + state.sigma_next * (pred.x - pred.uncond_denoised) / state.sigma
