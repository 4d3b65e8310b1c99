"""Stage ``export``: assemble the StableDiffusionPipeline folder, the CLIP and the judge.

Layout (``<target>`` = framework/bundled/weights with ``install=true``, else ``out_dir/weights``):
``pipeline/`` (unet, vae, text_encoder, tokenizer, scheduler; safetensors), ``clip/`` (CLIPModel,
tokenizer, image processor), ``judge/``. UNet, VAE and CLIP are stored in fp16; the pipeline's
text encoder stays fp32 (transformers loads checkpoints in their stored dtype, diffusers in fp32:
a plain ``from_pretrained`` must give one dtype).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTokenizer

from experiments.bundled_model.clip import image_processor
from experiments.bundled_model.unet import SCHEDULE, text_encoder_from_clip
from framework.bundled import WEIGHTS_DIR
from framework.bundled.judge import Judge


def scheduler() -> DDIMScheduler:
    """SD's schedule, every field explicit (steps_offset=1 matters for parity)."""
    return DDIMScheduler(**SCHEDULE, steps_offset=1, prediction_type="epsilon",
                         set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")


def export_target(install: bool, out: Path, unet: str = "unet") -> Path:
    """Where weights go: the shipped folder only when asked to install, else
    ``out/weights`` (``out/weights_<name>`` for a UNet trained under another name)."""
    if install:
        return WEIGHTS_DIR
    return out / ("weights" if unet == "unet" else f"weights_{unet}")


def export(out: Path, target: Path, unet: str = "unet") -> Path:
    """Write pipeline/, clip/ and judge/ under ``target`` (replacing them) from ``out``, with the
    UNet saved under ``out/<unet>``."""
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae").to(torch.float16),
        text_encoder=text_encoder_from_clip(out / "clip"),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(out / unet).to(torch.float16),
        scheduler=scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "clip", "judge"):
        shutil.rmtree(target / name, ignore_errors=True)
    pipe.save_pretrained(target / "pipeline", safe_serialization=True)
    clip = CLIPModel.from_pretrained(out / "clip", dtype=torch.float32).to(torch.float16)
    clip.save_pretrained(target / "clip", safe_serialization=True)
    tokenizer.save_pretrained(target / "clip")
    image_processor().save_pretrained(target / "clip")
    for folder in (target / "pipeline" / "tokenizer", target / "clip"):  # the BPE source files
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(out / "tokenizer" / name, folder / name)
    Judge.from_pretrained(out / "judge").save_pretrained(target / "judge")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"export: {target} ({size / 1e6:.1f} MB)")
    return target
