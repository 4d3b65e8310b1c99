"""Stage ``unet``: a small UNet2DConditionModel on the VAE's latents (16×16×4 for the shipped v3
VAE, 4× down; 8×8×4 for v2's 8× VAE), ε-prediction on SD's schedule.

The latents (VAE posterior mean × scaling_factor) and the frozen text encoder's 77-token hidden
states of a fixed training set are computed once and cached, so each step costs only the UNet.
Captions are dropped to the empty prompt with probability ``caption_dropout`` (for CFG); the
loss uses min-SNR-5 weighting; an EMA copy of the weights is what gets exported.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from experiments.bundled_model.common import (count_parameters, data_workers, initialised_with, load_state,
                                              plan_scenes_parallel, save_state, stage_seed, step_with_ema,
                                              train_loop)

SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                beta_end=0.012)


def build_unet(cfg: DictConfig, cross_attention_dim: int, latent_size: int = 8) -> UNet2DConditionModel:
    """A fresh UNet of the configured size (cross-attention on the levels ``unet.cross_attention``
    names, default every level as in SD 1.x; SDXL leaves its full-resolution level without) for
    ``latent_size``² latents (its ``sample_size``: the pipeline's default picture is that × the
    VAE's factor)."""
    u = cfg.unet
    attend = list(u.get("cross_attention") or [True] * len(u.channels))
    if len(attend) != len(u.channels):
        raise ValueError(f"unet.cross_attention={attend}: give one true/false per level of unet.channels={list(u.channels)}")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend))
    with initialised_with(cfg.seed):
        return UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4,
            down_block_types=down, up_block_types=up,
            block_out_channels=tuple(u.channels), layers_per_block=u.layers_per_block,
            cross_attention_dim=cross_attention_dim, attention_head_dim=u.heads,
            norm_num_groups=u.norm_groups)


def text_encoder_from_clip(clip_dir: Path) -> CLIPTextModel:
    """The CLIP's text tower as a standalone CLIPTextModel (the pipeline's text encoder)."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True, dtype=torch.float32)
    text = CLIPTextModel(clip.config.text_config)
    target = getattr(text, "text_model", text)
    missing, unexpected = target.load_state_dict(clip.text_model.state_dict(), strict=False)
    if missing or unexpected:  # layouts differ between transformers versions: try the other one
        text.load_state_dict(clip.text_model.state_dict())
    return text.eval()


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str],
                   batch: int = 256) -> torch.Tensor:
    """Hidden states [n, 77, d] exactly as StableDiffusionPipeline computes them."""
    out = []
    for i in range(0, len(prompts), batch):
        ids = tokenizer(prompts[i:i + batch], padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids.to(text_encoder.device))[0].cpu())
    return torch.cat(out)


@torch.no_grad()
def build_cache(cfg: DictConfig, out: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Latents, caption indices and the caption embedding table of the fixed training set, cached
    in ``out/unet_cache.json`` (its stamp) and the safetensors file it names."""
    path = out / "unet_cache.json"
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    stamp = [vae_config["scaling_factor"], (out / "clip" / "model.safetensors").stat().st_mtime,
             cfg.unet.n_train, cfg.seed]  # a decoder-only VAE phase keeps the cache valid
    loaded = load_state(path)
    if loaded is not None and loaded[1]["stamp"] == stamp:
        return loaded[0]
    plans = plan_scenes_parallel(cfg.unet.n_train, stage_seed(cfg.seed, "unet_set", 0),
                                 max(1, data_workers(cfg, device)), **cfg.world)
    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).eval()
    text = text_encoder_from_clip(out / "clip").to(device)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    captions, latents = [], []
    for plan in tqdm(plans, desc="encode latents"):  # drawn on the device, chunk by chunk
        images = plan.draw(device).images
        captions += plan.captions
        latents += [vae.encode(images[i:i + 512]).latent_dist.mean.cpu()
                    for i in range(0, len(images), 512)]
    latents = torch.cat(latents)
    unique = ["", *dict.fromkeys(captions)]
    index = {c: i for i, c in enumerate(unique)}
    emb = encode_prompts(text, tokenizer, unique).half()
    cache = {"latents": latents * vae.config.scaling_factor,
             "caption_ids": torch.tensor([index[c] for c in captions]),
             "embeddings": emb}
    save_state(path, cache, {"stamp": stamp}, hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12])
    print(f"unet cache: {len(captions)} latents (std {cache['latents'].std():.3f}), "
          f"{len(unique)} distinct captions")
    return cache


def train_unet(cfg: DictConfig, out: Path, device: torch.device) -> UNet2DConditionModel:
    """Train (or resume) the UNet; saves the EMA weights to ``out/<unet.name>``. Several UNets
    (different ``unet.name`` and sizes) may train at once from one cache (stage ``unet_cache``)."""
    u = cfg.unet
    cache = build_cache(cfg, out, device)
    latents, cap_ids = cache["latents"].to(device), cache["caption_ids"]
    table = cache["embeddings"].to(device)
    unet = (UNet2DConditionModel.from_pretrained(u.init) if u.init  # fine-tune a saved UNet
            else build_unet(cfg, table.shape[-1], latents.shape[-1])).to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    print(f"unet: {count_parameters(unet) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(unet.parameters(), lr=u.lr, weight_decay=0.01)
    abar = DDPMScheduler(**SCHEDULE).alphas_cumprod.to(device)

    def step_fn(step: int) -> dict[str, float]:
        gen = torch.Generator().manual_seed(stage_seed(cfg.seed, "unet", step))
        idx = torch.randint(len(latents), (u.batch_size,), generator=gen)
        x0 = latents[idx.to(device)]
        caps = cap_ids[idx].clone()
        caps[torch.rand(u.batch_size, generator=gen) < u.caption_dropout] = 0  # "" prompt
        cond = table[caps.to(device)].float()
        t = torch.randint(0, 1000, (u.batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = u.lr * min(1.0, (step + 1) / u.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = unet(xt, t, encoder_hidden_states=cond).sample.float()
        snr = abar[t] / (1 - abar[t])
        weight = snr.clamp(max=5.0) / snr
        loss = (weight * ((pred - noise) ** 2).flatten(1).mean(1)).mean()
        step_with_ema(opt, unet, ema, loss, step, u.ema_decay)
        return {"loss": loss.item()}

    train_loop(u.name, out, {"model": unet, "ema": ema}, opt, step_fn, u.steps, u.max_minutes,
               ckpt_every=500)
    ema.save_pretrained(out / u.name)
    return ema
