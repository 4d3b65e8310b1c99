"""Tiny SDXL, SD3 and Flux pipelines with random weights, built from configs (no download).

Each builder returns the real diffusers pipeline class with the components, scheduler settings and
VAE factors of its family's published checkpoint, at a size that samples a 64×64 image (8×8
latents) in milliseconds: deterministic given ``seed``, offline (tokenizers come from their own
small vocabularies), every module in ``eval()`` mode.

- ``build_tiny_sdxl`` — StableDiffusionXLPipeline: UNet2DConditionModel with
  ``addition_embed_type="text_time"``, CLIPTextModel + CLIPTextModelWithProjection (hidden sizes 32
  and 48, like CLIP-L and CLIP-G's 768 and 1280 differ), AutoencoderKL (4 channels, 0.13025),
  EulerDiscreteScheduler as in stable-diffusion-xl-base-1.0.
- ``build_tiny_sd3`` — StableDiffusion3Pipeline: SD3Transformer2DModel (patch 2), two
  CLIPTextModelWithProjection, optionally T5EncoderModel + T5TokenizerFast, AutoencoderKL (16
  channels, scaling 1.5305, shift 0.0609), FlowMatchEulerDiscreteScheduler with shift 3.0.
- ``build_tiny_flux`` — FluxPipeline: FluxTransformer2DModel with guidance embedding, CLIPTextModel
  + T5EncoderModel, AutoencoderKL (16 channels, scaling 0.3611, shift 0.1159),
  FlowMatchEulerDiscreteScheduler with dynamic shifting (FLUX.1-dev's config).

``save_tiny_*`` write a pipeline folder with ``save_pretrained``; ``load_tiny_*`` read it back
offline with ``from_pretrained(folder, local_files_only=True)``, which is all a real checkpoint
folder needs too. ``TinySDXL``, ``TinySD3`` and ``TinyFlux`` are the samplerlab models of the tiny
pipelines (``model=tiny_sdxl``, ``tiny_sd3``, ``tiny_flux``; built once per process and seed). An SD3 folder saved without T5 has ``text_encoder_3``/``tokenizer_3`` recorded as
absent in ``model_index.json``; diffusers then refuses to load it unless the call says so:
``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from framework.core.memo import Memo
from framework.models.flux import Flux
from framework.models.sd3 import StableDiffusion3
from framework.models.sdxl import StableDiffusionXL
from framework.models.tiny import write_char_tokenizer

#: stable-diffusion-xl-base-1.0's scheduler_config.json (its class: EulerDiscreteScheduler).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    timestep_spacing="leading",
    steps_offset=1,
    use_karras_sigmas=False,
)
#: stable-diffusion-3-medium's scheduler_config.json (FlowMatchEulerDiscreteScheduler).
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
#: FLUX.1-dev's scheduler_config.json (FlowMatchEulerDiscreteScheduler).
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
#: The VAE latent factors of each family's checkpoint (decode: latents / scaling + shift).
SDXL_VAE = dict(latent_channels=4, scaling_factor=0.13025, force_upcast=True)
SD3_VAE = dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
FLUX_VAE = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)

CLIP_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CLIP_G = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
#: T5 v1.1 layout (gated GELU, relative attention) at d_model 96: the joint attention width of the
#: SD3/Flux transformers, and ≥ 32 + 48 so SD3 can zero-pad the concatenated CLIP states to it.
T5 = dict(d_model=96, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=32, feed_forward_proj="gated-gelu")


# ---------------------------------------------------------------------------------------------
# Tokenizers and text encoders
# ---------------------------------------------------------------------------------------------
def clip_tokenizer(max_length: int = 77) -> Any:
    """A character-level CLIPTokenizer (any lower-case text tokenises): the tiny SD pipeline's
    vocab.json and merges.txt, written to a temporary folder that is removed once loaded."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="samplerlab-clip-") as folder:
        files = write_char_tokenizer(Path(folder))
        return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=max_length)


def t5_tokenizer() -> Any:
    """A T5TokenizerFast over a small unigram vocabulary ``[(piece, score), …]`` (pad 0, eos 1,
    unk 2 as in T5; word-initial pieces carry the "▁" of SentencePiece), built in memory."""
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + ".,!?'-()"        # T5 does not lower-case
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_text_model(tokenizer: Any, sizes: dict[str, int], projection: bool) -> Any:
    """A CLIPTextModel (or CLIPTextModelWithProjection, projection width = hidden width)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, projection_dim=sizes["hidden_size"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_encoder(tokenizer: Any) -> Any:
    """A T5EncoderModel from a config, in ``eval()``: built from a config it is in training mode,
    and its dropout (0.1) would make every encoding different."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, **T5)
    return T5EncoderModel(config).eval()


def vae(factors: dict[str, Any]) -> Any:
    """An AutoencoderKL with 8× downsampling (four blocks), like every family's VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64, **factors,
    ).eval()


# ---------------------------------------------------------------------------------------------
# The pipelines
# ---------------------------------------------------------------------------------------------
def build_tiny_sdxl(seed: int = 0) -> Any:
    """A StableDiffusionXLPipeline with random weights (deterministic given ``seed``), 64×64."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = clip_text_model(tokenizer, CLIP_L, projection=False)
        text_encoder_2 = clip_text_model(tokenizer_2, CLIP_G, projection=True)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
            cross_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + CLIP_G["hidden_size"],   # 6 time ids × 8 + pooled CLIP-G
        ).eval()
        autoencoder = vae(SDXL_VAE)
    return StableDiffusionXLPipeline(
        vae=autoencoder, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )


def build_tiny_sdxl_refiner(seed: int = 0, base: Any = None) -> Any:
    """A StableDiffusionXLImg2ImgPipeline refiner with random weights (deterministic given ``seed``),
    as stable-diffusion-xl-refiner-1.0 is made: no first text encoder, the base's CLIP-G encoder,
    tokenizer and VAE (``base``: the tiny SDXL of the same seed unless given), a UNet conditioned on
    CLIP-G's states only with five time ids (H, W, crop top, left, aesthetic score),
    ``requires_aesthetics_score`` and no zeroed empty prompt (the refiner's model_index)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    base = base if base is not None else tiny_pipeline("sdxl", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
            cross_attention_dim=CLIP_G["hidden_size"], addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=5 * 8 + CLIP_G["hidden_size"],   # 5 time ids × 8 + pooled CLIP-G
        ).eval()
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def build_tiny_sd3(seed: int = 0, with_t5: bool = True) -> Any:
    """A StableDiffusion3Pipeline with random weights (deterministic given ``seed``), 64×64;
    without T5 its third encoder and tokenizer are ``None`` (the pipeline then feeds zeros)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    tokenizer_3 = t5_tokenizer() if with_t5 else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = clip_text_model(tokenizer, CLIP_L, projection=True)
        text_encoder_2 = clip_text_model(tokenizer_2, CLIP_G, projection=True)
        text_encoder_3 = t5_encoder(tokenizer_3) if with_t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=T5["d_model"], caption_projection_dim=32,
            pooled_projection_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"], pos_embed_max_size=16,
        ).eval()
        autoencoder = vae(SD3_VAE)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=autoencoder,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def build_tiny_flux(seed: int = 0) -> Any:
    """A FluxPipeline (guidance-distilled, like FLUX.1-dev) with random weights, 64×64."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = clip_text_model(tokenizer, CLIP_L, projection=False)
        text_encoder_2 = t5_encoder(tokenizer_2)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * FLUX_VAE["latent_channels"], num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5["d_model"],
            pooled_projection_dim=CLIP_L["hidden_size"], guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        ).eval()
        autoencoder = vae(FLUX_VAE)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=autoencoder, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------
def save_tiny(pipeline: Any, folder: str | Path) -> Path:
    """Write ``pipeline`` as a diffusers pipeline folder (model_index.json, one sub-folder per
    component, safetensors weights); read it back with ``load_tiny(folder)``."""
    folder = Path(folder)
    pipeline.save_pretrained(folder)
    return folder


def save_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """The tiny SDXL pipeline as a folder: ``StableDiffusionXLPipeline.from_pretrained(folder,
    local_files_only=True)`` reads it back."""
    return save_tiny(build_tiny_sdxl(seed), folder)


def save_tiny_sd3(folder: str | Path, seed: int = 0, with_t5: bool = True) -> Path:
    """The tiny SD3 pipeline as a folder: ``StableDiffusion3Pipeline.from_pretrained(folder,
    local_files_only=True)`` reads it back; saved without T5, only with ``text_encoder_3=None,
    tokenizer_3=None`` added (diffusers refuses a folder that lacks an expected component)."""
    return save_tiny(build_tiny_sd3(seed, with_t5), folder)


def save_tiny_flux(folder: str | Path, seed: int = 0) -> Path:
    """The tiny Flux pipeline as a folder: ``FluxPipeline.from_pretrained(folder,
    local_files_only=True)`` reads it back."""
    return save_tiny(build_tiny_flux(seed), folder)


def load_tiny(folder: str | Path) -> Any:
    """A pipeline folder read back offline with the class its model_index.json names; a required
    component recorded as absent (``[null, null]``, e.g. SD3's T5 pair) is passed as ``None``, the
    one way ``from_pretrained`` accepts such a folder."""
    import diffusers

    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    absent = {name: None for name, value in index.items()
              if isinstance(value, list) and value == [None, None] and name not in cls._optional_components}
    return cls.from_pretrained(str(folder), local_files_only=True, **absent)


# ---------------------------------------------------------------------------------------------
# As samplerlab models (model=tiny_sdxl, tiny_sd3, tiny_flux)
# ---------------------------------------------------------------------------------------------
#: The tiny family pipelines built in this process, by (family, seed, with T5): SDXL, its refiner,
#: SD3 with and without T5, Flux — room for two seeds of each.
TINY: Memo[Any] = Memo("tiny family pipelines", 10)


def tiny_pipeline(family: str, seed: int = 0, with_t5: bool = True) -> Any:
    """The tiny pipeline of ``family`` (sdxl, sd3, flux), built once per process and seed."""
    builders = {"sdxl": lambda: build_tiny_sdxl(seed), "sd3": lambda: build_tiny_sd3(seed, with_t5),
                "flux": lambda: build_tiny_flux(seed), "sdxl_refiner": lambda: build_tiny_sdxl_refiner(seed)}
    return TINY.get((family, seed, with_t5 or family != "sd3"), builders[family])


class TinySDXL(StableDiffusionXL):
    """``model=tiny_sdxl``: the tiny SDXL pipeline, built in memory (``refiner=true``: with the tiny refiner)."""

    def __init__(self, seed: int = 0, height: int | None = None, width: int | None = None, vae_slice: int | None = None,
                 vae_tiling: bool = False, refiner: bool = False, refiner_switch: float = 0.8, refiner_sigma: float | None = None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5):
        super().__init__(pipeline=tiny_pipeline("sdxl", seed), height=height, width=width, vae_slice=vae_slice,
                         vae_tiling=vae_tiling, refiner_pipeline=tiny_pipeline("sdxl_refiner", seed) if refiner else None,
                         refiner_switch=refiner_switch, refiner_sigma=refiner_sigma, aesthetic_score=aesthetic_score,
                         negative_aesthetic_score=negative_aesthetic_score)


class TinySD3(StableDiffusion3):
    """``model=tiny_sd3``: the tiny SD3 pipeline, built in memory (without T5 when ``use_t5=false``)."""

    def __init__(self, seed: int = 0, use_t5: bool = True, height: int | None = None, width: int | None = None,
                 shift: float | None = None, vae_slice: int | None = None, vae_tiling: bool = False):
        super().__init__(pipeline=tiny_pipeline("sd3", seed, use_t5), use_t5=use_t5, height=height, width=width, shift=shift,
                         vae_slice=vae_slice, vae_tiling=vae_tiling)


class TinyFlux(Flux):
    """``model=tiny_flux``: the tiny Flux pipeline, built in memory."""

    def __init__(self, seed: int = 0, height: int | None = 64, width: int | None = 64, flux_guidance: float = 3.5,
                 true_cfg: bool = False, shift: float | None = None, vae_slice: int | None = None, vae_tiling: bool = False):
        super().__init__(pipeline=tiny_pipeline("flux", seed), height=height, width=width, flux_guidance=flux_guidance,
                         true_cfg=true_cfg, shift=shift, vae_slice=vae_slice, vae_tiling=vae_tiling)
