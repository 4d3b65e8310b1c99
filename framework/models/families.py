"""What the SDXL, SD3 and Flux adapters share: loading a pipeline folder of the right family, their
CLIP text encoders with samplerlab's text edits, the VAE with its latent factors, and the flow-model
arithmetic of SD3 and Flux (grid, shift, network time).

The adapters build on :class:`framework.models.diffusers_sd.StableDiffusion` (device and dtype
placement, ``compile``, VAE slicing and tiling, the per-grid timestep table): the denoising network
is its ``unet`` attribute whatever its kind (SD3's and Flux's are transformers).

Flow models (SD3, Flux) in σ-space (docs/models.md): σ = t/(1 − t), the state y = x_t/(1 − t) =
x0 + σ·ε, the network sees x_in = y/(1 + σ) = x_t at its time t = σ/(1 + σ), and D = x_in − t·v.
The checkpoint's scheduler config sets the shift, a constant factor s on σ (static ``shift``;
dynamic: e^μ with μ linear in the image's token count). The model's *training table*
(``train_sigmas``) is its T = 1000 training times u = k/T, k = 1 … T, shifted: σ_k = s·u/(1 − u) (the
last one is ∞, t = 1). The σ-range schedules (karras, exponential, …) run between its first and its
last finite entry, s·[1/999, 999]; the table schedules (simple, normal, sgm_uniform, ddim_uniform)
pick from it as they do from Stable Diffusion's; a grid's model time is an index into it, as for
Stable Diffusion, and the network's time is that of the σ it indexes (1000·t, diffusers' units).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from framework.bases.embeddings import T5Embeddings, TextEdit, TextEmbeddings, TokenInputs, for_encoder
from framework.core.errors import ConfigError, ModelNotFoundError
from framework.maths.flow import calculate_shift, flow_config, sigma_factor
from framework.maths.sigmas import flow_sigma, flow_time, sigma_at_time
from framework.models.diffusers_sd import PIPELINES, StableDiffusion, looks_like_path, quiet_loading
from framework.models.flow import FlowModel

#: The diffusers pipeline class of each family (the class a folder's model_index.json names).
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                    "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}
#: The samplerlab model of a pipeline class (for the hint of a wrong-family error).
MODEL_OF_CLASS = {"StableDiffusionPipeline": "model=sd15 (or sd21)", "StableDiffusionXLPipeline": "model=sdxl",
                  "StableDiffusion3Pipeline": "model=sd3", "FluxPipeline": "model=flux"}
#: The T5 component of each flow family (required by Flux, optional for SD3).
T5_COMPONENT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_family(family: str, path: str, allow_download: bool = False, variant: str | None = None,
                without: tuple[str, ...] = ()) -> Any:
    """The ``family`` pipeline (sdxl, sd3, flux) of a local folder or a hub id, offline unless
    downloads are allowed; ``without`` names components not to load (SD3's T5 pair). The folder is
    checked first: its pipeline class, every component it names, its scheduler config."""
    key = (family, path, allow_download, variant, without)
    return PIPELINES.get(key, lambda: _load_family(family, path, allow_download, variant, without))


def _load_family(family: str, path: str, allow_download: bool, variant: str | None, without: tuple[str, ...]) -> Any:
    local = Path(path).expanduser()
    if not local.exists() and looks_like_path(path):
        raise ModelNotFoundError(f"model.path '{path}': no such folder (give a local diffusers {PIPELINE_CLASSES[family]} folder)")
    absent: tuple[str, ...] = ()
    if local.exists():
        absent = check_folder(local, family, without)
        source, offline = str(local), True
    else:
        source = path
        offline = not allow_download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    kwargs: dict[str, Any] = {"use_safetensors": True, **({"variant": variant} if variant else {})}
    kwargs.update({name: None for name in (*without, *absent)})
    try:
        with quiet_loading():
            import diffusers

            pipe = getattr(diffusers, PIPELINE_CLASSES[family]).from_pretrained(source, local_files_only=offline, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if local.exists():
            raise ModelNotFoundError(f"cannot read the {family} pipeline in '{local}' ({msg})") from e
        raise ModelNotFoundError(
            f"checkpoint '{path}' is not available offline: download it once with `hf download {path}` (or run with "
            f"model.allow_download=true), or set model.path to a local diffusers folder" if offline
            else f"could not load checkpoint '{path}': {msg}") from e
    check_pipeline(pipe, family)
    return pipe


def refiner_folder(path: str, wanted: str, what: str) -> None:
    """A local refiner folder's pipeline class, checked before loading: one line naming what it is."""
    index_file = Path(path).expanduser() / "model_index.json"
    if not index_file.exists():
        return   # a hub id, or no folder: load_family says what is wrong
    found = json.loads(index_file.read_text()).get("_class_name")
    if found != wanted:
        raise ConfigError(f"model.refiner '{path}' is a {found} folder, not {what} ({wanted}): give the refiner's own "
                          "folder (e.g. stable-diffusion-xl-refiner-1.0)")


def check_folder(folder: Path, family: str, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Check a pipeline folder before loading it: model_index.json names the family's pipeline
    class, every component it names is there, the T5 encoder is there where the family needs it,
    the scheduler config is a flow one with a known shift mode (SD3, Flux). Returns the components
    the folder records as absent (``[null, null]``), which loading passes as None."""
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise ModelNotFoundError(f"'{folder}' is not a diffusers pipeline folder (no model_index.json): save one with "
                                 "pipeline.save_pretrained(folder) or point model.path at such a folder")
    index = json.loads(index_file.read_text())
    found, wanted = index.get("_class_name"), PIPELINE_CLASSES[family]
    if found != wanted:
        other = MODEL_OF_CLASS.get(str(found))
        raise ConfigError(f"model.path '{folder}' is a {found} folder, not {wanted}: "
                          + (f"use {other}" if other else f"model={family} needs a {wanted} folder"))
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
    absent = tuple(k for k, v in components.items() if v[0] is None or v[1] is None)
    t5 = T5_COMPONENT.get(family)
    if t5 is not None and t5 not in without and t5 in absent:
        raise ConfigError(missing_t5(family, folder))
    for name, (library, cls) in components.items():
        if name in absent or name in without:
            continue
        if not (folder / name).is_dir():
            raise ModelNotFoundError(f"'{folder}' lacks {name}/ (a {cls}) that model_index.json names: the folder is "
                                     "incomplete; download or save the whole pipeline again")
    if family in T5_COMPONENT:
        config_file = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        check_flow_scheduler(config, folder)
    return absent


def missing_t5(family: str, where: object) -> str:
    if family == "sd3":
        return (f"the SD3 pipeline in '{where}' has no T5 encoder (text_encoder_3): set model.use_t5=false to sample "
                "without it (zeros in its place, as diffusers does), or use a folder with T5")
    return f"the Flux pipeline in '{where}' has no T5 encoder (text_encoder_2): Flux needs it; use a complete folder"


def check_flow_scheduler(config: dict[str, Any], where: object, cls: str | None = None) -> dict[str, Any]:
    """A flow family's scheduler config, checked and completed: a FlowMatch scheduler, or one with
    ``use_flow_sigmas`` (whose ``flow_shift`` is the shift), with a known shift mode."""
    cls = cls or str(config.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
    if not (cls.startswith("FlowMatch") or config.get("use_flow_sigmas")):
        raise ConfigError(f"the scheduler of '{where}' is {cls} without use_flow_sigmas: SD3 and Flux checkpoints bring a "
                          "flow scheduler config, whose shift settings the model reads (fix scheduler/scheduler_config.json)")
    if "shift" not in config and "flow_shift" in config:
        config = {**config, "shift": config["flow_shift"]}
    try:
        return flow_config(config)
    except ConfigError as e:
        raise ConfigError(f"'{where}': {e}") from None


def check_pipeline(pipe: Any, family: str) -> None:
    """A pipeline object of the family's class (e.g. a prebuilt one passed as ``pipeline=``)."""
    wanted = PIPELINE_CLASSES[family]
    if type(pipe).__name__ != wanted:
        other = MODEL_OF_CLASS.get(type(pipe).__name__)
        raise ConfigError(f"the pipeline is a {type(pipe).__name__}, not {wanted}" + (f": use {other}" if other else ""))
    if family in T5_COMPONENT:
        check_flow_scheduler(dict(pipe.scheduler.config), type(pipe).__name__, type(pipe.scheduler).__name__)
    if family == "flux" and pipe.text_encoder_2 is None:
        raise ConfigError(missing_t5("flux", "the given pipeline"))


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------
class ClipText(TextEmbeddings):
    """A CLIP text encoder as the families use it: the hidden states of ``layer`` (−2, the
    penultimate, for SDXL and SD3) and its pooled output (the projected ``text_embeds`` of a
    CLIPTextModelWithProjection, else ``pooler_output``), from one forward pass, with text edits.
    :meth:`encode` (what edits such as prompt_mix call) returns the states."""

    def __init__(self, text_encoder: Any, tokenizer: Any, layer: int = -2):
        super().__init__(text_encoder, tokenizer)
        self.layer = layer

    def forward(self, inputs: TokenInputs) -> tuple[torch.Tensor, torch.Tensor]:
        with self._substitute_embeddings(inputs.token_embeds + inputs.position_embeds):
            out = self.text_encoder(inputs.ids, output_hidden_states=True)
        pooled = out[0] if out[0].dim() == 2 else out.pooler_output
        return out.hidden_states[self.layer], pooled

    def encode_inputs(self, inputs: TokenInputs) -> torch.Tensor:
        return self.forward(inputs)[0]

    def encode_pooled(self, prompts: Sequence[str], edits: Sequence[TextEdit] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, L, D], pooled [B, D']) of ``prompts`` with ``edits`` (token edits before the
        transformer, output edits on the states); only the edits whose ``encoders`` include CLIP act."""
        edits = for_encoder(edits, "clip")
        inputs = self.edited_inputs(prompts, edits)
        states, pooled = self.forward(inputs)
        for e in edits:
            states = e.edit_outputs(states, inputs, self, list(edits))
        return states, pooled


def t5_states(t5: T5Embeddings, prompts: Sequence[str], edits: Sequence[TextEdit]) -> torch.Tensor:
    """The T5 encoder's last hidden states [B, max_length, D] of ``prompts`` padded to its
    ``max_length``, edited by the edits whose ``encoders`` include T5 (token swaps and mixes, prompt
    weights, prompt mixes); the text has A1111 weight syntax removed when any edit parses it. With
    no edit: the pipeline's own encoding, bit for bit."""
    return t5.encode(prompts, for_encoder(edits, "t5"))


# ---------------------------------------------------------------------------------------------
# The adapters' common base
# ---------------------------------------------------------------------------------------------
class FamilyModel(StableDiffusion):
    """A diffusers pipeline of a modern family: text through :meth:`encode_edited` (the engine's
    encoding and every text edit), decoding with the VAE's scaling and shift factors."""

    family: ClassVar[str] = ""
    shift_factor: float = 0.0

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        super().setup(device, dtype)
        if dtype in (torch.float16, torch.bfloat16) and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)  # as the pipelines: this VAE overflows in half precision

    #: The kinds of text encoder the network reads (what a text edit's ``encoders`` may name).
    text_encoder_kinds: tuple[str, ...] = ("clip",)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode_edited(prompts, [])

    def encode_edited(self, prompts: Sequence[str], edits: Sequence[TextEdit]) -> dict[str, torch.Tensor]:
        """The network's conditioning tensors of ``prompts``, every CLIP encoder edited by ``edits``."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Images in [0, 1] from latents: the VAE decodes latents/scaling + shift."""
        parts = [self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype), return_dict=False)[0]
                 for z in self._vae_slices(latents)]
        img = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(latents.dtype) / 2 + 0.5
        return img.clamp(0, 1) if clamp else img

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (the posterior's mean, (z − shift)·scaling) of images in [0, 1]."""
        pixels = images.to(self.device, self.vae.dtype) * 2 - 1
        means = [self.vae.encode(p).latent_dist.mean for p in self._vae_slices(pixels)]
        z = means[0] if len(means) == 1 else torch.cat(means)
        return ((z - self.shift_factor) * self.scaling_factor).to(self.dtype)

    def image_size(self, default: int) -> tuple[int, int, int]:
        """(height, width, VAE factor), checked: multiples of the latent grid's pixel size."""
        factor = int(self.pipe.vae_scale_factor)
        multiple = factor * (2 if self.family == "flux" else 1)   # Flux packs 2×2 latent patches
        h, w = self._height or default, self._width or default
        if h % multiple or w % multiple:
            raise ConfigError(f"model={self.family}: height and width must be multiples of {multiple}, got {h}×{w}")
        return h, w, factor


class FlowFamily(FlowModel, FamilyModel):
    """SD3 and Flux: flow-matching transformers, sampled in σ-space (module docstring)."""

    #: The grid the family's pipeline asks FlowMatchEuler for: its default (SD3) or linspace(1, 1/N, N) (Flux).
    flow_grid: ClassVar[str] = "default"
    #: The fallback of the scheduler config's max_shift in the pipeline's μ (SD3's is 1.16).
    max_shift_fallback: ClassVar[float] = 1.15

    def flow_setup(self, shift: float | None) -> None:
        """The latent shape, the VAE factors and the flow schedule (called by ``_init_from_pipe``):
        ``scheduler_config`` (the checkpoint's, with ``shift`` overriding its shift rule), μ, the σ
        factor ``shift``, the training table and the σ range."""
        pipe = self.pipe
        self.unet = pipe.transformer  # the denoising network (StableDiffusion's name for it)
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.prediction_type = "flow"
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.get("shift_factor") or 0.0)
        config = check_flow_scheduler(dict(pipe.scheduler.config), type(pipe).__name__, type(pipe.scheduler).__name__)
        if shift is not None:
            if not shift > 0:
                raise ConfigError(f"model.shift must be > 0 (a factor on σ), got {shift}")
            config = {**config, "shift": float(shift), "use_dynamic_shifting": False}
        self.scheduler_config = config
        self.mu = (calculate_shift(self.image_seq_len(), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                   config.get("base_shift", 0.5), config.get("max_shift") or self.max_shift_fallback)
                   if config["use_dynamic_shifting"] else None)
        self.sigma_shift = sigma_factor(config, self.mu)
        self.num_train = int(config["num_train_timesteps"])
        table = np.array([self.sigma_shift * flow_sigma(k / self.num_train) for k in range(1, self.num_train + 1)])
        self._train_sigmas_np = table
        self.train_sigmas = torch.from_numpy(table)
        self.steps_offset = 0
        self.sigma_min, self.sigma_max = float(table[0]), float(table[-2])

    def image_seq_len(self) -> int:
        """The image's token count, which μ is linear in."""
        raise NotImplementedError

    def timestep_of(self, sigma: float, timestep: float | None) -> float:
        """The network's time in the scheduler's units (1000·t): that of σ, or of the σ a carried
        model time (an index into the training table) stands for — a scheduler's rounded timestep."""
        if timestep is not None:
            sigma = sigma_at_time(timestep, self._train_sigmas_np)
        return self.num_train * flow_time(sigma)

    def network_velocity(self, x_in: torch.Tensor, timestep: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's v at x_in (x_t) and ``timestep`` (a 0-d float32 tensor, 1000·t)."""
        raise NotImplementedError

    def velocity(self, x_in, t, tensors):
        return self.network_velocity(x_in, torch.tensor(self.num_train * t, dtype=torch.float32, device=x_in.device), tensors)

    def denoise_batch(self, x, sigma, timestep, tensors):
        x_in = x if math.isinf(sigma) else x / (1 + sigma)
        return x_in - flow_time(sigma) * self.network_velocity(x_in, self.timestep_tensor(sigma, timestep, x.device), tensors)
