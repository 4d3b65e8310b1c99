"""Hand-written sampling loops of diffusers' SDXL, SD3 and Flux pipelines: the references that
parity checks of model adapters compare against.

Each loop is the pipeline's ``__call__`` written out for the default path (diffusers 0.42):
prompt encoding straight from the tokenizers and text encoders, the scheduler's grid as the
pipeline asks for it, the network inputs of every step, classifier-free guidance, and
``scheduler.step``. Given the pipeline's weights, prompts, initial noise and scheduler, it returns
what the pipeline returns with ``output_type="latent"`` (bit-identical in float32 on CPU; the tests
check ≤ 1e-6 relative), together with the (timestep, σ) of every network evaluation, so a model
adapter's grid can be checked against the scheduler's.

- ``sdxl_loop``: any discrete scheduler (EulerDiscrete, DPMSolverMultistep, …); a batched CFG pass
  with pooled CLIP-G embeddings (``text_embeds``) and size/crop ids (``time_ids``); the
  unconditional text is zeros when no negative prompt is given (``force_zeros_for_empty_prompt``).
- ``sd3_loop``: FlowMatchEuler (static or dynamic shift), FlowMatchHeun, and the multistep
  schedulers with ``use_flow_sigmas``; a batched CFG pass; CLIP-L ⊕ CLIP-G states zero-padded to
  the T5 width and joined with the T5 states (zeros without T5); pooled CLIP-L ⊕ CLIP-G.
- ``flux_loop``: FlowMatchEuler with ``sigmas = linspace(1, 1/N, N)`` shifted by μ of the image
  token count; packed 2×2 latents, latent image ids, the distilled guidance as a network input,
  ``timestep / 1000``; true CFG (two unbatched passes) only with a negative prompt and
  ``true_cfg_scale > 1``.

``initial_noise`` draws the noise exactly as the pipelines' ``prepare_latents`` do from a CPU
generator, so a loop given it matches a pipeline given ``generator=torch.Generator().manual_seed(s)``.
``flow_match_sigmas`` (from :mod:`framework.maths.flow`, re-exported) rebuilds
FlowMatchEulerDiscreteScheduler's grid from its config (the formulas of
docs/model_families_notes.md) without the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from framework.maths.flow import calculate_shift, flow_match_sigmas

__all__ = [
    "LoopOutput", "initial_noise", "pack_latents", "unpack_latents", "latent_image_ids", "calculate_shift",
    "flow_match_sigmas", "sdxl_text", "sd3_text", "flux_text", "sdxl_loop", "sd3_loop", "flux_loop",
]


@dataclass(frozen=True)
class LoopOutput:
    """What a reference loop ends with."""

    #: The final latents, before the VAE: what the pipeline returns with ``output_type="latent"``
    #: (Flux: packed, (B, h·w/4, 4·C); ``unpack_latents`` gives (B, C, h, w)).
    latents: torch.Tensor
    #: Per network evaluation, in order: the timestep given to the scheduler and the network (Flux's
    #: network gets it / 1000), and the scheduler's σ there (flow schedulers: t ∈ [0, 1]; discrete
    #: ones: the VE σ). FlowMatchHeun evaluates 2N − 1 times, each intermediate point twice listed.
    steps: list[tuple[float, float]]


# ---------------------------------------------------------------------------------------------
# Latents
# ---------------------------------------------------------------------------------------------
def is_flux(pipe: Any) -> bool:
    from diffusers import FluxPipeline

    return isinstance(pipe, FluxPipeline)


def latent_size(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the latents for an image of ``height`` × ``width`` (Flux rounds down to even)."""
    f = pipe.vae_scale_factor
    if is_flux(pipe):
        return 2 * (height // (f * 2)), 2 * (width // (f * 2))
    return height // f, width // f


def latent_channels(pipe: Any) -> int:
    """Channels of the (unpacked) latents: the UNet's or transformer's input, Flux's / 4."""
    net = getattr(pipe, "unet", None) or pipe.transformer
    return net.config.in_channels // 4 if is_flux(pipe) else net.config.in_channels


def initial_noise(pipe: Any, height: int, width: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Unit Gaussian noise (B, C, h, w) drawn as ``prepare_latents`` draws it from
    ``torch.Generator().manual_seed(seed)`` (before SDXL's scaling by ``init_noise_sigma`` and Flux's
    packing)."""
    h, w = latent_size(pipe, height, width)
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((batch, latent_channels(pipe), h, w), generator=generator, dtype=torch.float32)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Flux's packing: (B, C, h, w) → (B, (h/2)·(w/2), 4·C), each token a 2×2 patch, channel-major."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of (h, w)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int) -> torch.Tensor:
    """Flux's image position ids for (h, w) latents: ((h/2)·(w/2), 3) rows (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------
def _grid(scheduler: Any) -> list[tuple[float, float]]:
    """(timestep, σ) of each entry of ``scheduler.timesteps`` (σ at the same index)."""
    return [(float(t), float(s)) for t, s in zip(scheduler.timesteps, scheduler.sigmas)]


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def _tokens(tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def _clip(tokenizer: Any, encoder: Any, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states, first output) of a CLIP text encoder: the first output is the
    projected pooled embedding of a CLIPTextModelWithProjection (SDXL's and SD3's pooled input)."""
    out = encoder(_tokens(tokenizer, prompts, max_length).to(encoder.device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def sdxl_text(pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL: (CLIP-L ⊕ CLIP-G penultimate states (B, 77, 32 + 48), pooled projected CLIP-G (B, 48))."""
    states_l, _ = _clip(pipe.tokenizer, pipe.text_encoder, prompts, pipe.tokenizer.model_max_length)
    states_g, pooled = _clip(pipe.tokenizer_2, pipe.text_encoder_2, prompts, pipe.tokenizer_2.model_max_length)
    return torch.cat([states_l, states_g], dim=-1), pooled


def sd3_text(pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3: ((CLIP-L ⊕ CLIP-G states, zero-padded to the T5 width) joined along the sequence with
    the T5 states (zeros without T5), pooled CLIP-L ⊕ CLIP-G)."""
    length = pipe.tokenizer.model_max_length          # the pipeline pads both CLIP tokenizers to the first's
    states_l, pooled_l = _clip(pipe.tokenizer, pipe.text_encoder, prompts, length)
    states_g, pooled_g = _clip(pipe.tokenizer_2, pipe.text_encoder_2, prompts, length)
    if pipe.text_encoder_3 is None:
        t5 = torch.zeros(len(prompts), max_sequence_length, pipe.transformer.config.joint_attention_dim,
                         dtype=pipe.text_encoder.dtype)
    else:
        t5 = pipe.text_encoder_3(_tokens(pipe.tokenizer_3, prompts, max_sequence_length).to(pipe.text_encoder_3.device))[0]
    clip = torch.nn.functional.pad(torch.cat([states_l, states_g], dim=-1), (0, t5.shape[-1] - states_l.shape[-1] - states_g.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)


def flux_text(pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux: (T5 last hidden states (B, L, d), pooled CLIP-L output (B, 32): unprojected)."""
    clip = pipe.text_encoder(_tokens(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length).to(pipe.text_encoder.device),
                             output_hidden_states=False)
    t5 = pipe.text_encoder_2(_tokens(pipe.tokenizer_2, prompts, max_sequence_length).to(pipe.text_encoder_2.device),
                             output_hidden_states=False)[0]
    return t5, clip.pooler_output


# ---------------------------------------------------------------------------------------------
# The loops
# ---------------------------------------------------------------------------------------------
def _guided(pred: torch.Tensor, scale: float) -> torch.Tensor:
    uncond, cond = pred.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sdxl_loop(pipe: Any, prompts: list[str], noise: torch.Tensor, steps: int, guidance_scale: float = 5.0,
              negative_prompts: list[str] | None = None, scheduler: Any = None) -> LoopOutput:
    """StableDiffusionXLPipeline's loop (``guidance_scale > 1``). ``noise`` (B, 4, h, w) is unit
    noise; the image size (the time ids) is the latent size × the VAE factor, as the pipeline's
    default ``original_size = target_size = (height, width)``, crop (0, 0)."""
    scheduler = scheduler or pipe.scheduler
    embeds, pooled = sdxl_text(pipe, prompts)
    if negative_prompts is None and pipe.config.force_zeros_for_empty_prompt:
        neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg_embeds, neg_pooled = sdxl_text(pipe, negative_prompts or [""] * len(prompts))
    height, width = (s * pipe.vae_scale_factor for s in noise.shape[-2:])
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype).repeat(2 * len(prompts), 1)
    context, text_embeds = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])

    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma        # the pipeline scales given latents too
    scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = pipe.unet(x_in, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                        return_dict=False)[0]
        latents = scheduler.step(_guided(eps, guidance_scale), t, latents, return_dict=False)[0]
    return LoopOutput(latents, _grid(scheduler))


@torch.no_grad()
def sd3_loop(pipe: Any, prompts: list[str], noise: torch.Tensor, steps: int, guidance_scale: float = 7.0,
             negative_prompts: list[str] | None = None, scheduler: Any = None, max_sequence_length: int = 256) -> LoopOutput:
    """StableDiffusion3Pipeline's loop (``guidance_scale > 1``): the network gets x_t itself and
    the timestep 1000·t; it predicts v ≈ ε − x0 and ``scheduler.step`` integrates dx/dt = v."""
    scheduler = scheduler or pipe.scheduler
    embeds, pooled = sd3_text(pipe, prompts, max_sequence_length)
    neg_embeds, neg_pooled = sd3_text(pipe, negative_prompts or [""] * len(prompts), max_sequence_length)
    context, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])

    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        p = pipe.transformer.config.patch_size
        kwargs["mu"] = calculate_shift((noise.shape[-2] // p) * (noise.shape[-1] // p), scheduler.config.get("base_image_seq_len", 256),
                                       scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                                       scheduler.config.get("max_shift", 1.16))   # 1.16: the SD3 pipeline's fallback
    scheduler.set_timesteps(steps, device=noise.device, **kwargs)
    latents = noise
    for t in scheduler.timesteps:
        v = pipe.transformer(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * len(prompts)), encoder_hidden_states=context,
                             pooled_projections=pooled, return_dict=False)[0]
        latents = scheduler.step(_guided(v, guidance_scale), t, latents, return_dict=False)[0]
    return LoopOutput(latents, _grid(scheduler))


@torch.no_grad()
def flux_loop(pipe: Any, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float = 3.5,
              negative_prompts: list[str] | None = None, true_cfg_scale: float = 1.0, scheduler: Any = None,
              max_sequence_length: int = 512) -> LoopOutput:
    """FluxPipeline's loop. ``noise`` (B, 16, h, w) is unit noise, packed here; the returned latents
    are packed, as the pipeline's. ``guidance`` is the distilled guidance, a network input (× 1000
    inside the network, like the timestep); true CFG runs only with ``negative_prompts`` and
    ``true_cfg_scale > 1``, as two unbatched passes."""
    scheduler = scheduler or pipe.scheduler
    embeds, pooled = flux_text(pipe, prompts, max_sequence_length)
    text_ids = torch.zeros(embeds.shape[1], 3, dtype=embeds.dtype)
    true_cfg = negative_prompts is not None and true_cfg_scale > 1
    if true_cfg:
        neg_embeds, neg_pooled = flux_text(pipe, negative_prompts, max_sequence_length)
    latents, image_ids = pack_latents(noise), latent_image_ids(*noise.shape[-2:])

    sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
                         scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
    if sigmas is None:
        scheduler.set_timesteps(steps, device=noise.device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=noise.device, mu=mu)
    scheduler.set_begin_index(0)
    g = torch.full([1], guidance, dtype=torch.float32).expand(len(prompts)) if pipe.transformer.config.guidance_embeds else None
    for t in scheduler.timesteps:
        net = dict(hidden_states=latents, timestep=t.expand(len(prompts)).to(latents.dtype) / 1000, guidance=g, txt_ids=text_ids,
                   img_ids=image_ids, return_dict=False)
        v = pipe.transformer(encoder_hidden_states=embeds, pooled_projections=pooled, **net)[0]
        if true_cfg:
            v_neg = pipe.transformer(encoder_hidden_states=neg_embeds, pooled_projections=neg_pooled, **net)[0]
            v = v_neg + true_cfg_scale * (v - v_neg)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return LoopOutput(latents, _grid(scheduler))
