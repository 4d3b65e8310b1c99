"""Stage ``clip``: a small CLIPModel trained contrastively on world captions.

Identical captions in a batch are all positives (a label-aware soft target), so duplicates are
not pushed apart. The vision tower reads images in [-1, 1] (the saved image processor maps
[0, 255] pixels there); its text tower becomes the pipeline's text encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from experiments.bundled_model.common import (batch_of_scenes, count_parameters, data_workers,
                                              initialised_with, train_loop)


def build_clip(cfg: DictConfig, tokenizer: CLIPTokenizer) -> CLIPModel:
    """A fresh CLIPModel of the configured size, with the tokenizer's special ids."""
    c = cfg.clip
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=c.text_hidden,
                         intermediate_size=c.text_hidden * 2, num_hidden_layers=c.text_layers,
                         num_attention_heads=c.heads, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=c.vision_hidden, intermediate_size=c.vision_hidden * 2,
                           num_hidden_layers=c.vision_layers, num_attention_heads=c.heads,
                           image_size=64, patch_size=c.patch_size),
        projection_dim=c.projection_dim, **ids)
    with initialised_with(cfg.seed):
        return CLIPModel(config)


def image_processor() -> CLIPImageProcessor:
    """Maps [0, 255] RGB pictures to the CLIP's input: 64×64, values in [-1, 1]."""
    return CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)


def clip_loss(model: CLIPModel, images: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric contrastive loss with all identical captions of the batch as positives."""
    img = model.get_image_features(pixel_values=images)
    txt = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions], device=logits.device)
    target = (ids[:, None] == ids[None]).float()
    target = target / target.sum(1, keepdim=True)
    return (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def train_clip(cfg: DictConfig, out: Path, device: torch.device) -> CLIPModel:
    """Train (or resume) the CLIP; saves the final model + tokenizer to ``out/clip``.

    With ``clip.vision_only=true`` (phase 2) the saved CLIP is fine-tuned with its text tower and
    text projection frozen: the text tower is the pipeline's text encoder, on which the UNet was
    trained, so only the image side may move."""
    c = cfg.clip
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    name = "clip"
    if c.vision_only:
        model = CLIPModel.from_pretrained(out / "clip", dtype=torch.float32)
        model.text_model.requires_grad_(False)
        model.text_projection.requires_grad_(False)
        name = "clip_vision"
    else:
        model = build_clip(cfg, tokenizer)
    model = model.to(device).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    print(f"clip: {count_parameters(model) / 1e6:.2f} M parameters, "
          f"{sum(p.numel() for p in trained) / 1e6:.2f} M trained")
    opt = torch.optim.AdamW(trained, lr=c.lr, weight_decay=0.05)

    def make_batch(step: int) -> tuple:
        scenes = batch_of_scenes(cfg, name, step, c.batch_size, **cfg.world)
        return scenes, tokenizer(scenes.captions, padding=True, return_tensors="pt")

    def step_fn(step: int, batch: tuple) -> dict[str, float]:
        scenes, tok = batch
        for g in opt.param_groups:
            g["lr"] = c.lr * min(1.0, (step + 1) / c.warmup)
        loss = clip_loss(model, scenes.draw(device).images, tok.input_ids.to(device),
                         tok.attention_mask.to(device), scenes.captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        return {"loss": loss.item()}

    train_loop(name, out, {"model": model}, opt, step_fn, c.steps, c.max_minutes,
               make_batch=make_batch, workers=data_workers(cfg, device))
    model.eval()
    model.save_pretrained(out / "clip")
    tokenizer.save_pretrained(out / "clip")
    image_processor().save_pretrained(out / "clip")
    return model
