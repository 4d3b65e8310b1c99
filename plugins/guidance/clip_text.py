"""CLIP text guidance (as in CLIP-guided diffusion, e.g. Nichol et al. 2022 "GLIDE" §3.2, and the
deep dive's suggestion): raise the image–text similarity of the decoded predicted x0.

loss = 1 − cos(f_img(image), f_txt(text)) under a CLIP: the bundled CLIP (default, offline,
framework.bundled.load_clip) or any transformers CLIPModel folder in ``model`` (read offline).
Images are resized (bilinear, antialiased) to the CLIP's input size and normalised with the
folder's ``preprocessor_config.json`` mean/std — differentiably, so the gradient reaches the
latents. Applied by framework.bases.loss_guidance (by default the normalised latent correction
x ← x − scale·σ·ĝ, ĝ the gradient at unit RMS per sample; ``normalize=false``: x ← x − scale·σ²·∇ₓloss).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from framework.plugin import ConfigError, LossGuidance, ModelNotFoundError, bundled

OPENAI_MEAN, OPENAI_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def pooled(out) -> torch.Tensor:
    """CLIP features as a tensor (transformers 5 returns an output object with ``pooler_output``)."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_clip_model(model: str | None):
    """(CLIPModel, tokenizer, mean, std) of the bundled CLIP (None) or a local transformers folder."""
    from transformers import AutoTokenizer, CLIPModel

    if model is None:
        clip, tokenizer = bundled.load_clip()
        folder = bundled.CLIP_DIR
    else:
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"CLIP folder '{model}' not found (no config.json): give a local transformers CLIP folder in guidance.clip_text.model, or null for the bundled CLIP")
        clip = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return clip.requires_grad_(False), tokenizer, mean, std


@dataclass
class CLIPText(LossGuidance):
    input_files: ClassVar[tuple[str, ...]] = ("model",)  # a local CLIP folder, read by content into the run key
    text: str = ""
    model: str | None = None
    scale: float = 0.2
    normalize: bool = True
    every: int = 1

    def setup(self, run) -> TextTarget:
        if not self.text.strip() or self.text == "???":
            raise ConfigError("guidance.clip_text.text is empty: give the text to guide towards, e.g. 'guidance.clip_text.text=a green square'")
        clip, tokenizer, mean, std = load_clip_model(self.model)
        clip = clip.to(run.device, run.dtype)
        tok = tokenizer([self.text], padding=True, return_tensors="pt").to(run.device)
        with torch.no_grad():
            t = pooled(clip.get_text_features(**tok))
        return TextTarget(clip, torch.nn.functional.normalize(t.float(), dim=-1),
                          torch.tensor(mean, device=run.device, dtype=run.dtype).reshape(1, 3, 1, 1),
                          torch.tensor(std, device=run.device, dtype=run.dtype).reshape(1, 3, 1, 1))

    def loss(self, images, context: TextTarget):
        return 1 - context.similarity(images)


@dataclass
class TextTarget:
    """One run's CLIP, the text's unit embedding and the image normalisation."""

    clip: torch.nn.Module
    text: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [n] of images in [0, 1] with the text."""
        size = int(self.clip.config.vision_config.image_size)
        if images.shape[-2:] != (size, size):
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                                     align_corners=False)
        f = pooled(self.clip.get_image_features(pixel_values=(images - self.mean) / self.std))
        return (torch.nn.functional.normalize(f.float(), dim=-1) * self.text).sum(-1)
