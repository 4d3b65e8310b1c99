"""CFGNorm (ComfyUI's CFGNorm node, after HiDream-E1's ``clip_cfg_norm``; HiDream-I1, Cai et al.
2025): the CFG prediction is shrunk, at every latent position, to the channel norm of the
conditional prediction.

p_cfg = p_u + w·(p_c − p_u) (w the top-level ``cfg_scale``); at every position (h, w) the norm over
channels, scale = clamp(‖p_c‖/(‖p_cfg‖ + 1e-8), 0, 1), and p = ``strength``·scale·p_cfg. It only
ever shrinks (strength ≤ 1).

Space: ``native`` by default (HiDream-E1 applies it to the velocity), ``denoised`` as an option
(ComfyUI's node works on the denoised estimate: ``space=denoised`` is that node); the norms make
the two differ. ``start``/``stop``: the guidance window as fractions of the run. Use instead of
``cfg``. Needs a channel dimension: latents [B, C, …].
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import ConfigError, NativeGuidance, hookimpl


@dataclass
class CFGNorm(NativeGuidance):
    strength: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength < 0:
            raise ConfigError(f"cfg_norm.strength must be ≥ 0, got {self.strength}")

    @hookimpl
    def configure(self, run) -> None:
        super().configure(run)
        if run.model.is_conditional and len(run.model.latent_shape) < 2:
            raise ConfigError(f"cfg_norm takes norms over channels and needs latents [C, H, W]; this model's are "
                              f"{list(run.model.latent_shape)}: use cfg_rescale or mambo_g")

    def combine(self, state, cond, uncond):
        guided = uncond + state.run.settings.cfg_scale * (cond - uncond)
        scale = (cond.norm(dim=1, keepdim=True) / (guided.norm(dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
        return guided * scale * self.strength
