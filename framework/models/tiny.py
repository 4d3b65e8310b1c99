"""A tiny Stable Diffusion pipeline with random weights, built from configs (no download).

Same classes and scheduler settings as SD 1.5 (UNet2DConditionModel, AutoencoderKL with 8×
downsampling, CLIPTextModel, CLIPTokenizer over its own vocabulary files, scaled-linear betas
0.00085–0.012 over 1000 steps, ``steps_offset=1``), at a size that samples in milliseconds.
For tests and as a stand-in for a real checkpoint.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from framework.core.memo import Memo
from framework.models.diffusers_sd import StableDiffusion

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def write_char_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of a character-level CLIP BPE (any lowercase text tokenises)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-()")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline with random weights (deterministic given ``seed``)."""
    from framework.models.diffusers_sd import quiet_loading

    with quiet_loading():  # the imports print transformers' notices
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="samplerlab-tok-") as tmp:  # read at construction, then removed
        tok_dir = write_char_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
        )
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type})
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


#: The tiny pipelines built in this process, by (seed, prediction type).
PIPELINES: Memo[Any] = Memo("tiny pipelines", 2)


class TinyRandom(StableDiffusion):
    """``model=tiny_random``: the tiny pipeline, built in memory (once per process and seed)."""

    def __init__(self, seed: int = 0, prediction_type: str = "epsilon", height: int | None = None, width: int | None = None,
                 vae_slice: int | None = None, vae_tiling: bool = False):
        super().__init__(pipeline=PIPELINES.get((seed, prediction_type), lambda: build_tiny_pipeline(seed, prediction_type)), height=height, width=width, vae_slice=vae_slice,
                         vae_tiling=vae_tiling)
