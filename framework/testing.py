"""Helpers for plugin authors' test suites (the conformance kit grows here).

``diffusers_loop`` is the reference every parity check compares against: the sampling loop of
diffusers' StableDiffusionPipeline written out by hand (prompt encoding, batched CFG pass,
``scale_model_input``, ``scheduler.step``), optionally followed by the VAE decode.
"""
from __future__ import annotations

from typing import Any

import torch


def diffusers_loop(
    pipe: Any, scheduler: Any, steps: int, latents: torch.Tensor, prompts: list[str], cfg_scale: float,
    decode: bool = False,
) -> torch.Tensor:
    """Final latents (or images in [0, 1] with ``decode``) of a hand-written diffusers loop."""
    scheduler.set_timesteps(steps)
    tok = pipe.tokenizer(prompts + [""] * len(prompts), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        cond, uncond = pipe.text_encoder(tok.input_ids.to(latents.device))[0].chunk(2)
        ctx = torch.cat([uncond, cond])
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps_u, eps_c = pipe.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            latents = scheduler.step(eps_u + cfg_scale * (eps_c - eps_u), t, latents).prev_sample
        if not decode:
            return latents
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)
