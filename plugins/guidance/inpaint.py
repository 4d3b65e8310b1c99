"""Inpainting by per-step re-noising of the known region (diffusers' legacy
StableDiffusionInpaintPipelineLegacy; "blended" sampling as in RePaint without its resampling):
``mask`` is an image file, white (> 0.5 after box-averaging to the latent grid) where new content is
generated and black where ``image`` is kept. With z₀ = encode(image) and n the run's initial noise,

- before every step the known region is reset to its forward-process value, x ← m·x + (1−m)·(z₀ + σ·n);
- at every evaluation the denoised estimate (and its CFG halves) is z₀ there, so the solver's step
  keeps x = z₀ + σ'·n in the known region and the final latents (σ = 0) equal z₀ there exactly.

Starts like img2img (``strength`` 1 = the whole grid, from z₀ + σ₀·n). Put it after the CFG plugin
(its replacement also applies to the CFG halves, so either order gives the same result)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.plugin import ConfigError, hookimpl, load_image
from plugins.guidance.img2img import Img2Img


@dataclass
class _Known:
    latents: torch.Tensor  # z0, expanded to the batch
    noise: torch.Tensor    # the batch's initial unit noise


@dataclass
class Inpaint(Img2Img):
    key: ClassVar[str] = "inpaint"
    input_files: ClassVar[tuple[str, ...]] = ("image", "mask")  # read by content into the run key
    mask: str = ""
    strength: float = 1.0

    @hookimpl
    def configure(self, run):
        super().configure(run)
        c, h, w = run.model.latent_shape
        self.source(run).keep = (load_image(self.mask, (h, w), f"guidance.{self.key}.mask", mode="L") <= 0.5).float()

    @hookimpl
    def init_latents(self, run, batch, schedule, noise):
        with torch.no_grad():
            z0 = run.model.encode_images(self.source(run).pixels).to(noise.device, noise.dtype).expand_as(noise)
        batch.stash.get(self, lambda: _Known(z0, noise))
        return z0 + schedule.sigmas[0] * noise

    def known(self, state) -> tuple[torch.Tensor, torch.Tensor, _Known]:
        k = state.stash.get(self, lambda: None)
        if k is None:
            raise ConfigError("inpaint starts the run itself (init_latents): do not combine it with img2img")
        keep = self.source(state.run).keep.to(k.latents.device, k.latents.dtype)
        return keep, 1 - keep, k

    @hookimpl
    def before_step(self, state):
        keep, new, k = self.known(state)
        state.x = new * state.x + keep * (k.latents + state.sigma * k.noise)

    @hookimpl
    def guidance(self, state, pred):
        keep, new, k = self.known(state)

        def paste(d):
            return None if d is None else new * d + keep * k.latents

        return type(pred)(x=pred.x, sigma=pred.sigma, denoised=paste(pred.denoised),
                          cond_denoised=paste(pred.cond_denoised), uncond_denoised=paste(pred.uncond_denoised))
