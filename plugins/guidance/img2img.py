"""img2img (SDEdit, Meng et al. 2022; diffusers' StableDiffusionImg2ImgPipeline): start from an
encoded image noised to σ_start instead of pure noise. ``strength`` ∈ (0, 1] picks the start as
diffusers does — the last ⌊N·strength⌋ steps of the N-step grid are sampled — so NFE shrinks
with strength; x = encode(image) + σ_start·noise (σ-space). ``image`` is a file path (PNG/JPEG),
resized to the model's pixel size."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from framework import hookimpl
from framework.errors import ConfigError


def load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A [1, 3, H, W] float tensor in [0, 1] from an image file, resized to ``size`` (H, W)."""
    from PIL import Image

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"img2img image '{path}' not found: give an existing image file in guidance.img2img.image")
    img = Image.open(file).convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255


@dataclass
class Img2Img:
    image: str = ""
    strength: float = 0.6

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:
            raise ConfigError(f"img2img.strength must be in (0, 1], got {self.strength}")

    @hookimpl
    def configure(self, run):
        if not hasattr(run.model, "encode_images"):
            raise ConfigError("img2img needs a model with an image encoder (a VAE): use an image model")
        c, h, w = run.model.latent_shape
        factor = 2 ** (len(run.model.vae.config.block_out_channels) - 1)
        self._pixels = load_image(self.image, (h * factor, w * factor))

    @hookimpl
    def adjust_schedule(self, run, schedule):
        keep = min(schedule.steps, max(1, int(schedule.steps * self.strength)))  # as diffusers (floor)
        start = schedule.steps - keep
        ts = None if schedule.timesteps is None else schedule.timesteps[start:]
        return replace(schedule, sigmas=schedule.sigmas[start:], timesteps=ts, init_noise_scale=schedule.sigmas[start])

    @hookimpl
    def init_latents(self, run, batch, schedule, noise):
        with torch.no_grad():
            latents = run.model.encode_images(self._pixels).to(noise.device, noise.dtype)
        return latents.expand_as(noise) + schedule.sigmas[0] * noise
