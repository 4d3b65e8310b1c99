"""CFG with rescaling (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", §3.4, as diffusers' ``guidance_rescale``): on the noise estimate ε = (x − D)/σ,
ε_cfg = ε_u + s·(ε_c − ε_u); ε_resc = ε_cfg·std(ε_c)/std(ε_cfg) (std per sample over all other
dimensions); ε = φ·ε_resc + (1 − φ)·ε_cfg, s the top-level ``cfg_scale``. φ = 0 is plain CFG. Use
instead of ``cfg``."""
from __future__ import annotations

import math
from dataclasses import dataclass

from framework.plugin import ConfigError, UncondGuidance, hookimpl


@dataclass
class CFGRescale(UncondGuidance):
    phi: float = 0.7

    def __post_init__(self) -> None:
        if not 0 <= self.phi <= 1:
            raise ConfigError(f"cfg_rescale.phi must be in [0, 1], got {self.phi}")

    @hookimpl
    def guidance(self, state, pred):
        if pred.uncond_denoised is None:
            return pred
        x, sigma, scale = pred.x, pred.sigma, state.run.settings.cfg_scale
        if math.isinf(sigma):  # a flow model's t = 1: the ratio of the stds tends to 1, plain CFG
            return pred.with_denoised(pred.uncond_denoised + scale * (pred.cond_denoised - pred.uncond_denoised))
        eps_c = (x - pred.cond_denoised) / sigma
        eps_u = (x - pred.uncond_denoised) / sigma
        eps = eps_u + scale * (eps_c - eps_u)
        dims = tuple(range(1, x.ndim))
        rescaled = eps * (eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
        eps = self.phi * rescaled + (1 - self.phi) * eps
        return pred.with_denoised(x - sigma * eps)
