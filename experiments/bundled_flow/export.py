"""Stage ``export``: the StableDiffusion3Pipeline folder of the bundled flow model.

``<target>`` (framework/bundled/weights/flow with ``install=true``, else ``out_dir/weights_flow``):

- ``transformer/`` — the EMA transformer, fp16 safetensors;
- ``scheduler/`` — FlowMatchEulerDiscreteScheduler, 1000 training steps, static ``shift`` = flow.shift;
- ``text_encoder/``, ``text_encoder_2/`` — the same CLIPTextModelWithProjection (the VP pipeline's
  text tower and the bundled CLIP's text projection; :func:`experiments.bundled_flow.model.text_encoder_with_projection`),
  fp32 (transformers loads a checkpoint in its stored dtype: a plain ``from_pretrained`` must give one dtype);
- ``tokenizer/``, ``tokenizer_2/`` — the bundled tokenizer with ``model_max_length`` = flow.max_length;
- no T5: ``text_encoder_3`` and ``tokenizer_3`` are recorded as absent, so the folder loads as
  diffusers documents for SD3 without T5: ``from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``;
- ``vae/`` — the VP pipeline's VAE weights file copied byte for byte, its config with
  ``shift_factor: 0.0`` (SD3's pipeline decodes latents / scaling_factor + shift_factor).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from omegaconf import DictConfig
from transformers import CLIPTokenizer

from experiments.bundled_flow.model import text_encoder_with_projection, vp_pipeline
from framework.bundled import CLIP_DIR, PIPELINE_DIR, WEIGHTS_DIR

VAE_FILE = "diffusion_pytorch_model.safetensors"


def scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler with the model's static shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))


def export_target(install: bool, out: Path) -> Path:
    """Where the folder goes: the shipped one only when asked to install."""
    return WEIGHTS_DIR / "flow" if install else out / "weights_flow"


def export_vae(target: Path, source: Path = PIPELINE_DIR / "vae") -> None:
    """The VP pipeline's VAE: weights byte-identical, config with shift_factor 0.0."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / VAE_FILE, target / VAE_FILE)
    config = json.loads((source / "config.json").read_text())
    config["shift_factor"] = 0.0
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export(cfg: DictConfig, out: Path, target: Path) -> Path:
    """Write the pipeline folder ``target`` (replacing it) from ``out/transformer`` and the VP model's parts."""
    vp = vp_pipeline(cfg)
    tokenizer = CLIPTokenizer.from_pretrained(vp / "tokenizer", model_max_length=int(cfg.flow.max_length))
    encoder = text_encoder_with_projection(vp, CLIP_DIR)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(out / "transformer").to(torch.float16),
        scheduler=scheduler(cfg.flow.shift), vae=None,
        text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=encoder, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    shutil.rmtree(target, ignore_errors=True)
    pipe.save_pretrained(target, safe_serialization=True)
    index = json.loads((target / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (target / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    export_vae(target / "vae", vp / "vae")
    for folder in (target / "tokenizer", target / "tokenizer_2"):  # the BPE source files, as the VP folder has them
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(vp / "tokenizer" / name, folder / name)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"export: {target} ({size / 1e6:.1f} MB)")
    return target
