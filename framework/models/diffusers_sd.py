"""Stable Diffusion checkpoints through diffusers (ε- and v-prediction), as a samplerlab model.

In σ-space a discrete VP model is evaluated as D(x, σ) from the UNet output u at the input
x·c_in, c_in = 1/√(σ² + 1), and the timestep t of σ (carried by the schedule, else log-σ
interpolation):  ε-prediction D = x − σ·u;  v-prediction D = x/(σ² + 1) − σ/√(σ² + 1)·u.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from framework.errors import ConfigError, ModelNotFoundError
from framework.models.base import Model, vp_scale
from framework.sigmas import sigma_to_t, train_sigmas_from_alphas_cumprod


@functools.lru_cache(maxsize=2)
def load_pipeline(path: str, allow_download: bool = False, variant: str | None = None) -> Any:
    """A StableDiffusionPipeline from a local folder or a hub id; offline unless downloads are allowed.

    The last two pipelines stay loaded, so the runs of a sweep in one process load a model once.
    """
    from diffusers import StableDiffusionPipeline

    local = Path(path).expanduser()
    kwargs: dict[str, Any] = dict(safety_checker=None, requires_safety_checker=False, use_safetensors=True)
    if variant:
        kwargs["variant"] = variant
    if local.exists():
        if not (local / "model_index.json").exists():
            raise ModelNotFoundError(
                f"'{local}' is not a diffusers pipeline folder (no model_index.json): "
                "save one with pipeline.save_pretrained(folder) or point model.path at such a folder"
            )
        source: str = str(local)
        offline = True
    else:
        source = path
        offline = not allow_download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        return StableDiffusionPipeline.from_pretrained(source, local_files_only=offline, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "safetensors" in msg.lower() and local.exists():
            raise ModelNotFoundError(f"cannot read the weights in '{local}' ({msg}): the file is corrupt or not safetensors") from e
        if offline:
            raise ModelNotFoundError(
                f"checkpoint '{path}' is not available offline: download it once with `hf download {path}` "
                f"(or run with model.allow_download=true), or set model.path to a local diffusers folder"
            ) from e
        raise ModelNotFoundError(f"could not load checkpoint '{path}': {msg}") from e


class StableDiffusion(Model):
    """A diffusers StableDiffusionPipeline checkpoint (SD 1.x/2.x and look-alikes)."""

    is_conditional = True

    def __init__(
        self,
        path: str = "",
        allow_download: bool = False,
        variant: str | None = None,
        height: int | None = None,
        width: int | None = None,
        prediction_type: str | None = None,
        pipeline: Any = None,
    ):
        if pipeline is None and not path:
            raise ConfigError("model.path is empty: give a hub id or a local diffusers folder")
        self.path, self.allow_download, self.variant = path, allow_download, variant
        self._height, self._width = height, width
        self._prediction_type = prediction_type
        self.pipe = pipeline
        if self.pipe is None:
            self.pipe = load_pipeline(path, allow_download, variant)
        self._init_from_pipe()

    def _init_from_pipe(self) -> None:
        pipe = self.pipe
        sched = pipe.scheduler
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.prediction_type = self._prediction_type or sched.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type '{self.prediction_type}' is not supported: use epsilon or v_prediction")
        self.alphas_cumprod = sched.alphas_cumprod.detach().clone()
        self.train_sigmas = train_sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self._train_sigmas_np = self.train_sigmas.numpy()
        self.steps_offset = int(sched.config.get("steps_offset", 0))
        self.sigma_min = float(self.train_sigmas[0])
        self.sigma_max = float(self.train_sigmas[-1])
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.unet.config.sample_size
        h = self._height or size * factor
        w = self._width or size * factor
        if h % factor or w % factor:
            raise ConfigError(f"height and width must be multiples of {factor}, got {h}×{w}")
        self.latent_shape = (self.unet.config.in_channels, h // factor, w // factor)
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        if getattr(self, "_placed", None) == (device, dtype):  # pipeline.to() costs ~0.1 s even when nothing moves
            return
        super().setup(device, dtype)
        if self.unet.dtype != dtype:
            self.pipe.to(dtype=dtype)
        self.pipe.to(device)
        self._placed = (device, dtype)

    def timestep_of(self, sigma: float, timestep: float | None) -> float:
        return timestep if timestep is not None else sigma_to_t(sigma, self._train_sigmas_np)

    def denoise_batch(self, x, sigma, timestep, tensors):
        t = torch.tensor(self.timestep_of(sigma, timestep), dtype=torch.float32, device=x.device)
        u = self.unet(x * vp_scale(sigma), t, **tensors, return_dict=False)[0]
        if self.prediction_type == "epsilon":
            return x - sigma * u
        return x * vp_scale(sigma) ** 2 - sigma * vp_scale(sigma) * u

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return tok.input_ids.to(self.device)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden = self.text_encoder(self.tokenize(prompts))[0]
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def output_latents(self, x: torch.Tensor, sigma_last: float) -> torch.Tensor:
        return x * vp_scale(sigma_last) if sigma_last > 0 else x

    has_decoder = True

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        img = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0] / 2 + 0.5
        return img.clamp(0, 1) if clamp else img

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (mean of the posterior, scaled) of images in [0, 1]."""
        dist = self.vae.encode(images.to(self.device, self.dtype) * 2 - 1).latent_dist
        return dist.mean * self.scaling_factor
