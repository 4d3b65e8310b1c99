"""Inpainting by per-step re-noising of the known region (diffusers' legacy
StableDiffusionInpaintPipelineLegacy; "blended" sampling as in RePaint without its resampling):
``mask`` is an image file, white (> 0.5 after box-averaging to the latent grid) where new content is
generated and black where ``image`` is kept. With z₀ = encode(image), n the run's initial noise and
m the latent mask (1 = generate),

- before every step the known region is reset to its forward-process value, x ← m·x + (1−m)·(z₀ + σ·n);
- at every evaluation the denoised estimate (and its CFG halves) is z₀ there, so the solver's step
  keeps x = z₀ + σ'·n in the known region and the final latents (σ = 0) equal z₀ there exactly.

``blend`` softens the mask's edge in latents (a blurred latent mask, as A1111's mask blur and
ComfyUI's noise mask): m is the mask box-blurred over ``blend`` latent cells on each side, a linear
ramp across the edge, so new and known content meet through a band that follows both instead of a
one-cell step; beyond the band the known region stays exact. ``blend=0``: the hard mask.
After decoding (``adjust_images``), ``paste_back`` pastes the known pixels back (diffusers'
``apply_overlay``) and matches the generated pixels to them (:func:`overlay`: the decoder's colour
shift, and its local error feathered over ``feather`` pixels): the decoder mixes the halves (its
GroupNorm statistics and receptive field span the whole latent), so without it the kept pixels are
only close, and with a plain paste the new content's colours step at the edge (docs/guidance.md,
measured).

Starts like img2img (``strength`` 1 = the whole grid, from z₀ + σ₀·n). Put it after the CFG plugin
(its replacement also applies to the CFG halves, so either order gives the same result)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.plugin import ConfigError, hookimpl, load_image, pixel_size
from plugins.guidance.img2img import Img2Img, noised


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
    blend: int = 1
    paste_back: bool = True
    feather: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blend < 0:
            raise ConfigError(f"{self.key}.blend must be ≥ 0 latent cells (0: the hard mask), got {self.blend}")
        if self.feather < 0:
            raise ConfigError(f"{self.key}.feather must be ≥ 0 pixels, got {self.feather}")

    @hookimpl
    def configure(self, run):
        super().configure(run)
        c, h, w = run.model.latent_shape
        generate = load_image(self.mask, (h, w), f"guidance.{self.key}.mask", mode="L") > 0.5
        self.source(run).keep = 1 - soften(generate, self.blend)

    def pixel_mask(self, run) -> torch.Tensor:
        """The mask at the model's pixel size [1, 1, H, W], 1 where new content is generated."""
        def load() -> torch.Tensor:
            return (load_image(self.mask, pixel_size(run.model), f"guidance.{self.key}.mask", mode="L") > 0.5).float()

        return run.stash.get(self, load, "pixel_mask")

    @hookimpl
    def adjust_images(self, run, batch, images):
        if not self.paste_back:
            return images
        return overlay(images, self.source(run).pixels, self.pixel_mask(run), self.feather)

    @hookimpl
    def init_latents(self, run, batch, schedule, noise):
        with torch.no_grad():
            z0 = run.model.encode_images(self.source(run).pixels).to(noise.device, noise.dtype).expand_as(noise)
        batch.stash.get(self, lambda: _Known(z0, noise))
        return noised(z0, schedule.sigmas[0], noise)

    def known(self, state) -> tuple[torch.Tensor, torch.Tensor, _Known]:
        k = state.stash.get(self, lambda: None)
        if k is None:
            raise ConfigError("inpaint starts the run itself (init_latents): do not combine it with img2img")
        keep = self.source(state.run).keep.to(k.latents.device, k.latents.dtype)
        return keep, 1 - keep, k

    @hookimpl
    def before_step(self, state):
        keep, new, k = self.known(state)
        state.x = new * state.x + keep * noised(k.latents, state.sigma, k.noise)

    @hookimpl
    def guidance(self, state, pred):
        keep, new, k = self.known(state)

        def paste(d):
            return None if d is None else new * d + keep * k.latents

        return type(pred)(x=pred.x, sigma=pred.sigma, denoised=paste(pred.denoised),
                          cond_denoised=paste(pred.cond_denoised), uncond_denoised=paste(pred.uncond_denoised))


def soften(generate: torch.Tensor, cells: int) -> torch.Tensor:
    """A mask [1, 1, h, w] (true = generate) box-blurred over ``cells`` cells on each side of its
    edge (edges of the picture replicated): a linear ramp across 2·cells + 1 cells; 0: the mask."""
    m = generate.float()
    if cells == 0:
        return m
    padded = torch.nn.functional.pad(m, (cells,) * 4, mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, 2 * cells + 1, stride=1)


def overlay(images: torch.Tensor, source: torch.Tensor, generate: torch.Tensor, feather: int) -> torch.Tensor:
    """Decoded ``images`` [n, 3, H, W] with the ``source`` pixels [1, 3, H, W] pasted back where the
    pixel mask ``generate`` [1, 1, H, W] is 0 (the kept pixels are the source's exactly), and the
    generated pixels corrected by the decoder's error measured on the kept ones, e = source − decoded:
    by its mean everywhere (the decoder's colour shift, which its whole-picture GroupNorm statistics
    give both regions alike), and near the edge by its local value, carried across the edge and
    fading linearly to 0 over ``feather`` pixels — so the new content meets the kept pixels without a
    step (the boundary matching of Poisson image editing, Pérez et al. 2003, feathered instead of
    solved). The source's own pixels in the generated region, the content being replaced, never show."""
    gen = (generate > 0.5).to(images.device, images.dtype)
    kept = 1 - gen
    source = source.to(images.device, images.dtype)
    shift = ((source - images) * kept).sum((2, 3), keepdim=True) / kept.sum().clamp_min(1)
    images = images + shift
    out = gen * images + kept * source
    error, have = kept * (source - images), kept.expand_as(images[:, :1]).clone()
    for k in range(1, feather + 1):  # one pixel ring per round: the mean error of its reached neighbours
        total = torch.nn.functional.avg_pool2d(error, 3, stride=1, padding=1)
        count = torch.nn.functional.avg_pool2d(have, 3, stride=1, padding=1)
        ring = (count > 0) & (have == 0)
        error = torch.where(ring, total / count.clamp_min(1e-12), error)
        have = torch.where(ring, torch.ones_like(have), have)
        out = out + ring * (1 - k / (feather + 1)) * error
    return out
