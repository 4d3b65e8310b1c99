"""img2img (SDEdit, Meng et al. 2022; diffusers' StableDiffusionImg2ImgPipeline): start from an
encoded image noised to σ_start instead of pure noise. ``strength`` ∈ (0, 1] picks the start as
diffusers does — the last ⌊N·strength⌋ steps of the N-step grid are sampled — so NFE shrinks
with strength; x = encode(image) + σ_start·noise (σ-space). ``image`` is a file path (PNG/JPEG),
resized to the model's pixel size."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from framework.plugin import ConfigError, hookimpl, load_image, pixel_size


@dataclass
class _Source:
    """A run's source image (and, for inpainting, the kept region), in the run's stash."""

    pixels: torch.Tensor
    keep: torch.Tensor | None = None


@dataclass
class Img2Img:
    key: ClassVar[str] = "img2img"
    input_files: ClassVar[tuple[str, ...]] = ("image",)  # read by content into the run key
    image: str = ""
    strength: float = 0.6

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:
            raise ConfigError(f"{self.key}.strength must be in (0, 1], got {self.strength}")

    def source(self, run) -> _Source:
        def load() -> _Source:
            return _Source(load_image(self.image, pixel_size(run.model), f"guidance.{self.key}.image"))

        return run.stash.get(self, load)

    @hookimpl
    def configure(self, run):
        if not hasattr(run.model, "encode_images"):
            raise ConfigError(f"{self.key} needs a model with an image encoder (a VAE): use an image model")
        self.source(run)

    @hookimpl
    def adjust_schedule(self, run, schedule):
        keep = min(schedule.steps, max(1, int(schedule.steps * self.strength)))  # as diffusers (floor)
        start = schedule.steps - keep
        ts = None if schedule.timesteps is None else schedule.timesteps[start:]
        scale = schedule.sigmas[start] if math.isfinite(schedule.sigmas[start]) else 1.0  # from σ = ∞: unit noise
        return replace(schedule, sigmas=schedule.sigmas[start:], timesteps=ts, init_noise_scale=scale)

    @hookimpl
    def init_latents(self, run, batch, schedule, noise):
        with torch.no_grad():
            latents = run.model.encode_images(self.source(run).pixels).to(noise.device, noise.dtype)
        return noised(latents.expand_as(noise), schedule.sigmas[0], noise)


def noised(latents: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """The forward process at σ, latents + σ·noise; at σ = ∞ (strength 1 on a flow model's grid,
    which starts at t = 1) the state is the unit noise itself, the limit of (latents + σ·noise)/σ."""
    return noise if math.isinf(sigma) else latents + sigma * noise
