"""Classifier-free guidance (Ho & Salimans 2022): D = D_uncond + scale·(D_cond − D_uncond).

Linear in D, so identical to guiding the noise prediction ε as diffusers does. ``scale`` defaults
to the top-level ``cfg_scale``; the negative prompt (top-level ``negative_prompt``) is the
unconditional input. scale = 1, or an unconditional model, needs no second pass.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework import hookimpl


@dataclass
class CFG:
    scale: float = 5.0

    @hookimpl
    def configure(self, run):
        if run.model.is_conditional and self.scale != 1.0:
            run.request_uncond()

    @hookimpl
    def guidance(self, state, pred):
        if pred.uncond_denoised is None:
            return pred
        return pred.with_denoised(pred.uncond_denoised + self.scale * (pred.cond_denoised - pred.uncond_denoised))
