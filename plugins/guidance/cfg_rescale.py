"""CFG with rescaling (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", §3.4, as diffusers' ``guidance_rescale``): on the noise estimate ε = (x − D)/σ,
ε_cfg = ε_u + s·(ε_c − ε_u); ε_resc = ε_cfg·std(ε_c)/std(ε_cfg) (std per sample over all other
dimensions); ε = φ·ε_resc + (1 − φ)·ε_cfg, s the top-level ``cfg_scale``. φ = 0 is plain CFG. Use
instead of ``cfg``."""
from __future__ import annotations

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
        x, sigma = pred.x, pred.sigma
        eps_c = (x - pred.cond_denoised) / sigma
        eps_u = (x - pred.uncond_denoised) / sigma
        eps = eps_u + state.run.settings.cfg_scale * (eps_c - eps_u)
        dims = tuple(range(1, x.ndim))
        rescaled = eps * (eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
        eps = self.phi * rescaled + (1 - self.phi) * eps
        return pred.with_denoised(x - sigma * eps)
