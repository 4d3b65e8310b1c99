"""Stages ``cache`` and ``flow``: the training set in the VP model's latent space, and the transformer.

``cache``: scenes of the world encoded by the shipped VP pipeline's VAE (posterior mean ×
scaling_factor: the latent space the VP UNet was trained on; the encoder stays frozen), and per
distinct caption (the empty one first) the SD3 conditioning (the CLIP tower's penultimate hidden
states over the flow tokenizer's ``max_length`` rows and its projected pooled feature) and the VP
teacher's conditioning (last hidden states, 77 rows).

``flow``: rectified flow x_t = (1 − t)·x0 + t·ε, v ≈ ε − x0, t logit-normal (SD3: sigmoid of
N(``t_mean``, ``t_std``)) then shifted by ``shift`` (σ' = shift·σ); loss
``fm_weight``·‖v − (ε − x0)‖² + ``distill_weight``·‖v − v_teacher‖², the second on the samples
whose σ = t/(1 − t) lies in the teacher's range [0.029, 14.6]: v_teacher = (1 + σ)·ε̂ − y is the
velocity whose denoiser D = x_t − t·v is the VP UNet's D(y, σ, c) at the same caption (or the empty
one when it was dropped, so both the conditional and the unconditional D are distilled). Captions
drop to "" with probability ``caption_dropout`` (CFG). EMA of the weights is what gets exported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from omegaconf import DictConfig
from tqdm import tqdm
from transformers import CLIPTokenizer

from experiments.bundled_flow.model import (Teacher, build_transformer, compact_context, logit_normal_t,
                                            text_encoder_with_projection, use_compact_context, vp_pipeline)
from experiments.bundled_model.common import (count_parameters, load_state, plan_scenes_parallel, save_state,
                                              stage_seed, step_with_ema, train_loop)
from framework.bundled import CLIP_DIR, PIPELINE_DIR


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@torch.no_grad()
def encode_captions(captions: list[str], max_length: int, batch: int = 256,
                    pipeline: Path = PIPELINE_DIR) -> dict[str, torch.Tensor]:
    """SD3 states [n, max_length, 128] (penultimate layer), pooled [n, 64] (projected), and the VP
    teacher's states [n, 77, 128] (last layer), fp16; one tower (the VP pipeline's text encoder)."""
    tok = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")
    enc = text_encoder_with_projection(pipeline, CLIP_DIR)
    sd3, pooled, vp = [], [], []
    for i in range(0, len(captions), batch):
        ids = tok(captions[i:i + batch], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        vp.append(out.last_hidden_state.half())
        short = tok(captions[i:i + batch], padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
        out = enc(short, output_hidden_states=True)
        sd3.append(out.hidden_states[-2].half())
        pooled.append(out.text_embeds.half())
    return {"sd3_states": torch.cat(sd3), "pooled": torch.cat(pooled), "vp_states": torch.cat(vp)}


@torch.no_grad()
def build_cache(cfg: DictConfig, out: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The cached training set (``out/flow_cache.json`` and the safetensors file it names);
    rebuilt when the VAE's encoder input (its weights file), the text encoder, the size or the seed change."""
    path = out / "flow_cache.json"
    vp = vp_pipeline(cfg)
    stamp = [file_digest(vp / "vae" / "diffusion_pytorch_model.safetensors"),
             file_digest(vp / "text_encoder" / "model.safetensors"),
             cfg.flow.n_train, cfg.seed, cfg.flow.max_length]
    loaded = load_state(path)
    if loaded is not None and loaded[1]["stamp"] == stamp:
        return loaded[0]
    plans = plan_scenes_parallel(cfg.flow.n_train, stage_seed(cfg.seed, "flow_set", 0), 1, **cfg.world)
    vae = AutoencoderKL.from_pretrained(vp / "vae").to(device).eval()
    captions, latents = [], []
    for plan in tqdm(plans, desc="encode latents"):
        images = plan.draw(device).images
        captions += plan.captions
        latents += [vae.encode(images[i:i + 256]).latent_dist.mean.cpu() for i in range(0, len(images), 256)]
    unique = ["", *dict.fromkeys(captions)]
    index = {c: i for i, c in enumerate(unique)}
    cache = {"latents": torch.cat(latents) * vae.config.scaling_factor,
             "caption_ids": torch.tensor([index[c] for c in captions]),
             **encode_captions(unique, cfg.flow.max_length, pipeline=vp)}
    save_state(path, cache, {"stamp": stamp}, hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:12])
    print(f"flow cache: {len(captions)} latents (std {cache['latents'].std():.3f}), {len(unique)} distinct captions")
    return cache


def sd3_condition(cache: dict[str, torch.Tensor], caps: torch.Tensor, device: torch.device):
    """(compact context [B, max_length + 1, 256], pooled [B, 128]) of caption indices: both
    encoders are the same tower, so each is its output twice, side by side."""
    states = cache["sd3_states"][caps].to(device).float()
    pooled = cache["pooled"][caps].to(device).float()
    return compact_context(torch.cat([states, states], -1)), torch.cat([pooled, pooled], -1)


def learning_rate(f: DictConfig, step: int) -> float:
    """Linear warm-up to ``f.lr``; then constant, or (``lr_schedule: cosine``) a cosine decay to
    ``f.lr_min`` at step ``f.steps``."""
    lr = f.lr * min(1.0, (step + 1) / f.warmup)
    if f.get("lr_schedule", "constant") == "cosine" and step >= f.warmup:
        done = min(1.0, (step - f.warmup) / max(1, f.steps - f.warmup))
        lr = f.lr_min + (f.lr - f.lr_min) * 0.5 * (1 + math.cos(math.pi * done))
    return lr


def train_flow(cfg: DictConfig, out: Path, device: torch.device):
    """Train (or resume) the transformer; saves the EMA weights to ``out/transformer``."""
    f = cfg.flow
    cache = build_cache(cfg, out, device)
    latents, cap_ids = cache["latents"].to(device), cache["caption_ids"]
    model = build_transformer(cfg, latents.shape[-1]).to(device).train()
    if f.get("init"):  # a warm start (the checkpoint of a resumed run still wins: train_loop loads it after)
        from diffusers import SD3Transformer2DModel

        model.load_state_dict(SD3Transformer2DModel.from_pretrained(f.init).state_dict())
    use_compact_context(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    teacher = Teacher(UNet2DConditionModel.from_pretrained(vp_pipeline(cfg) / "unet")).to(device)
    print(f"transformer: {count_parameters(model) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=f.lr, weight_decay=0.01)

    def step_fn(step: int) -> dict[str, float]:
        gen = torch.Generator().manual_seed(stage_seed(cfg.seed, "flow", step))
        idx = torch.randint(len(latents), (f.batch_size,), generator=gen)
        x0 = latents[idx.to(device)]
        caps = cap_ids[idx].clone()
        caps[torch.rand(f.batch_size, generator=gen) < f.caption_dropout] = 0  # "" prompt
        t = logit_normal_t(f.batch_size, gen, f.t_mean, f.t_std, f.shift).clamp(1e-4, 1 - 1e-4)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = t.to(device)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        ctx, pooled = sd3_condition(cache, caps, device)
        for g in opt.param_groups:
            g["lr"] = learning_rate(f, step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v = model(hidden_states=xt, timestep=1000 * t, encoder_hidden_states=ctx,
                      pooled_projections=pooled).sample.float()
        loss_fm = ((v - (noise - x0)) ** 2).mean()
        loss, logs = f.fm_weight * loss_fm, {"fm": loss_fm.item()}
        sigma = t / (1 - t)
        keep = (sigma >= teacher.sigma_min) & (sigma <= teacher.sigma_max)
        if f.distill_weight and keep.any():
            k = keep.nonzero().squeeze(1)
            y = xt[k] * (1 + sigma[k]).view(-1, 1, 1, 1)
            states = cache["vp_states"][caps[k.cpu()]].to(device).float()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                target = teacher.velocity(y, sigma[k], states).float()
            loss_d = ((v[k] - target) ** 2).mean()
            loss = loss + f.distill_weight * loss_d * (len(k) / f.batch_size)
            logs["distill"] = loss_d.item()
        step_with_ema(opt, model, ema, loss, step, f.ema_decay)
        logs["loss"] = loss.item()
        return logs

    reached = train_loop("flow", out, {"model": model, "ema": ema}, opt, step_fn, f.steps, f.max_minutes,
                         ckpt_every=f.ckpt_every)
    ema.set_attn_processor(JointAttnProcessor2_0())  # exported: attends over the pipeline's full context
    ema.save_pretrained(out / "transformer")
    (out / "transformer" / "training_step.json").write_text(json.dumps({"step": reached}))  # what export/check measure
    return ema
