"""Smoothed energy guidance, SEG (Hong 2024, "Smoothed Energy Guidance: Guiding Diffusion Models
with Reduced Energy Curvature of Attention"): a second conditional evaluation whose self-attention
queries in the chosen layers are blurred by a 2-D Gaussian of ``blur_sigma`` tokens on the image
grid — which blurs the attention weights, i.e. smooths the attention's energy landscape — and
D ← D + scale·(D_c − D_pert) (after ``cfg``: D_u + s·(D_c − D_u) + scale·(D_c − D_pert), diffusers'
SmoothedEnergyGuidance). ``blur_sigma: inf`` (the paper's σ → ∞ limit and default) replaces every
query by the mean query: uniform attention.

Note on diffusers 0.42: its hook (``hooks/smoothed_energy_guidance_utils.py``) takes the mean for
every σ *below* ``seg_blur_threshold_inf`` and the Gaussian only above it, the reverse of the
original SEG code; samplerlab follows the paper (finite σ: Gaussian; ∞: mean). Both agree at σ = ∞.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.plugin import ConfigError, Perturbation, PerturbationGuidance


@dataclass
class SEG(PerturbationGuidance):
    scale: float = 3.0
    blur_sigma: float = math.inf
    layers: list[int] | None = None
    start: float = 0.0
    stop: float = 1.0

    branch = "seg"

    def __post_init__(self) -> None:
        if not float(self.blur_sigma) > 0:
            raise ConfigError(f"guidance.seg.blur_sigma must be > 0 tokens (or inf: the mean), got {self.blur_sigma}")

    def perturbation(self, layers):
        return Perturbation("blur_attention", layers, blur_sigma=float(self.blur_sigma))
