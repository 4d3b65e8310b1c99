"""Stable Diffusion checkpoints through diffusers (ε- and v-prediction), as a samplerlab model.

In σ-space a discrete VP model is evaluated as D(x, σ) from the UNet output u at the input
x·c_in, c_in = 1/√(σ² + 1), and the timestep t of σ (carried by the schedule, else log-σ
interpolation):  ε-prediction D = x − σ·u;  v-prediction D = x/(σ² + 1) − σ/√(σ² + 1)·u.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from framework.core.errors import ConfigError, ModelNotFoundError
from framework.core.memo import Memo
from framework.core.model import Model
from framework.models.base import vp_scale
from framework.maths.sigmas import sigma_to_t, train_sigmas_from_alphas_cumprod


#: The pipelines loaded in this process (the last two stay loaded, so the runs of a sweep in one
#: process load a model once).
PIPELINES: Memo[Any] = Memo("loaded pipelines", 2)


def load_pipeline(path: str, allow_download: bool = False, variant: str | None = None) -> Any:
    """A StableDiffusionPipeline from a local folder or a hub id; offline unless downloads are allowed."""
    return PIPELINES.get((path, allow_download, variant), lambda: _load_pipeline(path, allow_download, variant))


def looks_like_path(path: str) -> bool:
    """Whether ``model.path`` names a folder rather than a hub id (``owner/name``): absolute, or
    starting with ``./``, ``../`` or ``~`` (a hub id is never any of these)."""
    return path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or path in (".", "..") or os.path.isabs(path)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading bars, notices and warnings off while a pipeline loads
    (restored afterwards): the console shows samplerlab's own lines only."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, verbosity, bar in saved:
            lib.set_verbosity(verbosity)
            if bar:
                lib.enable_progress_bar()


def _load_pipeline(path: str, allow_download: bool, variant: str | None) -> Any:
    local = Path(path).expanduser()
    kwargs: dict[str, Any] = dict(safety_checker=None, requires_safety_checker=False, use_safetensors=True)
    if variant:
        kwargs["variant"] = variant
    if not local.exists() and looks_like_path(path):
        raise ModelNotFoundError(f"model.path '{path}': no such folder (give a local diffusers pipeline folder, "
                                 "or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5)")
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
        with quiet_loading():
            from diffusers import StableDiffusionPipeline  # its import alone prints transformers' notices

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
        vae_slice: int | None = None,
        vae_tiling: bool = False,
    ):
        if pipeline is None and not path:
            raise ConfigError("model.path is empty: give a hub id or a local diffusers folder")
        if vae_slice is not None and vae_slice < 1:
            raise ConfigError(f"model.vae_slice must be ≥ 1 images per VAE call (or null: the whole batch), got {vae_slice}")
        self.vae_slice, self.vae_tiling = vae_slice, vae_tiling
        self._compiled: Any = None  # the compiled UNet (compile=true), see network_for_call
        self._t_table: dict[float, torch.Tensor] = {}
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

    def prepare_network(self, compile: bool = False, mode: str | None = None, channels_last: bool = False) -> None:
        """``compile=true``: the UNet compiled (:mod:`framework.models.compiled`); ``channels_last``:
        its weights in NHWC layout. Both are undone by a later run that does not ask for them."""
        from framework.models import compiled

        compiled.set_channels_last(self.unet, channels_last)
        self._compiled = (
            compiled.compile_network(self.unet, compiled.resolve_mode(mode, self.device), self.device, self.unet.dtype)
            if compile else None
        )

    def perturbation_layers(self) -> list[str]:
        """The network's transformer blocks (:mod:`framework.models.perturb`), the layers a
        perturbation indexes."""
        from framework.models import perturb

        return [name for name, _ in perturb.transformer_blocks(self.unet)]

    def check_perturbation(self, perturbation: Any) -> None:
        from framework.models import perturb

        super().check_perturbation(perturbation)
        perturb.check(self.unet, perturbation)

    def perturbed(self, plan: Any, maps: dict[str, int]) -> Any:
        """Perturbations on rows of the next UNet/transformer call (:mod:`framework.models.perturb`)."""
        from framework.models import perturb

        try:  # a transformer's image token count (SD3, Flux); a UNet's attention sees image tokens only
            image_tokens: int | None = self.image_seq_len()  # type: ignore[attr-defined]
        except (AttributeError, NotImplementedError):
            image_tokens = None
        return perturb.perturbed(self.unet, plan, maps, self.latent_shape[-2] / self.latent_shape[-1], image_tokens)

    def prepare_schedule(self, schedule: Any) -> None:
        """The timestep of every σ of the grid as 0-d device tensors, made with one transfer; the
        steps look them up instead of creating a tensor from a Python float each time. (Each its
        own tensor, not a view: a compiled network sees the same input layout every step.)"""
        ts = [self.timestep_of(s, schedule.timestep(s)) for s in schedule.sigmas]
        table = torch.tensor(ts, dtype=torch.float32, device=self.device)
        self._t_table = {t: row.clone() for t, row in zip(ts, table.unbind())}

    def timestep_of(self, sigma: float, timestep: float | None) -> float:
        return timestep if timestep is not None else sigma_to_t(sigma, self._train_sigmas_np)

    def timestep_tensor(self, sigma: float, timestep: float | None, device: torch.device) -> torch.Tensor:
        """The UNet's timestep input for σ: from the run's table (grid σ), else made here (a σ off
        the grid: churn, midpoint solvers)."""
        t = self.timestep_of(sigma, timestep)
        found = self._t_table.get(t)
        if found is not None and found.device == device:
            return found
        return torch.tensor(t, dtype=torch.float32, device=device)

    def denoise_batch(self, x, sigma, timestep, tensors):
        return self.unet_denoised(self.network_for_call(self.unet), self.prediction_type, x, sigma, timestep, tensors)

    def unet_denoised(self, net, prediction_type: str, x, sigma, timestep, tensors):
        """D(x, σ) from the VP UNet ``net`` (ε- or v-prediction) at σ's model time."""
        t = self.timestep_tensor(sigma, timestep, x.device)
        u = net(x * vp_scale(sigma), t, **tensors, return_dict=False)[0]
        if prediction_type == "epsilon":
            return x - sigma * u
        return x * vp_scale(sigma) ** 2 - sigma * vp_scale(sigma) * u

    def denoise_tensor(self, x, sigma, t, tensors):
        """compile=step: :meth:`unet_denoised` on the eager UNet with σ and t as 0-d device tensors."""
        c = (sigma * sigma + 1).rsqrt()
        u = self.unet(x * c, t, **tensors, return_dict=False)[0]
        if self.prediction_type == "epsilon":
            return x - sigma * u
        return x * (c * c) - (sigma * c) * u

    def time_input(self, sigma, timestep):
        return self.timestep_tensor(sigma, timestep, self.device)

    @property
    def native_space(self) -> str:
        """The UNet's output: ``epsilon`` or ``v_prediction`` (``flow`` for the flow families)."""
        return self.prediction_type

    def to_native(self, x, sigma, denoised):
        """The UNet output u that gives D (the inverse of :meth:`denoise_batch`'s arithmetic):
        ε-prediction u = (x − D)/σ; v-prediction u = (x·c² − D)/(σ·c), c = 1/√(σ² + 1)."""
        if self.prediction_type == "epsilon":
            return super().to_native(x, sigma, denoised)
        c = vp_scale(sigma)
        return (x * c**2 - denoised) / (sigma * c)

    def from_native(self, x, sigma, native):
        if self.prediction_type == "epsilon":
            return super().from_native(x, sigma, native)
        c = vp_scale(sigma)
        return x * c**2 - sigma * c * native

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

    def _vae_slices(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch cut into ``vae_slice``-sized pieces (one piece without slicing), with the VAE's
        tiling switched to ``vae_tiling`` (diffusers' enable_tiling: tiles with blended seams, for
        images larger than the VAE's sample_size; the VAE is shared, so each call sets it)."""
        if self.vae_tiling:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()
        return (batch,) if self.vae_slice is None else batch.split(self.vae_slice)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Images in [0, 1]; ``model.vae_slice=N`` decodes N images per VAE call (peak memory of
        N images, same result), ``model.vae_tiling=true`` decodes in tiles."""
        parts = [self.vae.decode(z / self.scaling_factor, return_dict=False)[0] for z in self._vae_slices(latents)]
        img = (parts[0] if len(parts) == 1 else torch.cat(parts)) / 2 + 0.5
        return img.clamp(0, 1) if clamp else img

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (mean of the posterior, scaled) of images in [0, 1] (sliced/tiled as decode)."""
        pixels = images.to(self.device, self.dtype) * 2 - 1
        means = [self.vae.encode(p).latent_dist.mean for p in self._vae_slices(pixels)]
        return (means[0] if len(means) == 1 else torch.cat(means)) * self.scaling_factor
