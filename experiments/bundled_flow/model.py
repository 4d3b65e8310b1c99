"""The parts of the bundled flow model: the tiny SD3 transformer, its text encoders, the teacher.

- :func:`build_transformer` — diffusers' ``SD3Transformer2DModel`` on the VP pipeline's latents
  (16×16×4 for the shipped v3 VAE, patch 2: 64 image tokens; 8×8×4 for v2's: 16), joint
  attention width 256 (the two 128-wide CLIP states side by side, as SD3's pipeline concatenates them), pooled width 128 (two 64-wide CLIP projections), RMS q/k norm.
- :func:`text_encoder_with_projection` — the bundled CLIP's text tower as a
  ``CLIPTextModelWithProjection``: the VP pipeline's (fp32) text encoder and the bundled CLIP's own
  trained ``text_projection`` (128 → 64), so ``text_embeds`` is the CLIP's text feature. SD3's
  pipeline wants two such encoders; both are this one.
- **Compact context** (training only): without T5, SD3's pipeline appends ``max_sequence_length``
  (256) zero rows to the 77 CLIP rows. Identical context rows stay identical through every joint
  block (each row is processed alone, and no position is added to the context), so 256 of them
  act in attention as one row whose key counts 256 times: one row and an additive attention bias of
  log 256 on its key give the same network output (:class:`CompactJointAttnProcessor`; checked in
  tests/bundled/test_bundled_flow.py). Training sees 16 + 78 tokens instead of 16 + 333.
- :class:`Teacher` — the bundled VP UNet as a σ-space denoiser: D(y, σ) = y − σ·ε̂(y/√(1+σ²), τ(σ)),
  τ interpolated in log σ over SD's training table (k-diffusion's convention).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from omegaconf import DictConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from experiments.bundled_model.common import initialised_with
from framework.bundled import PIPELINE_DIR

CLIP_WIDTH = 128          # hidden width of the bundled CLIP text tower
POOLED_WIDTH = 64         # its projection (CLIP feature) width
JOINT_WIDTH = 2 * CLIP_WIDTH
T5_ROWS = 256             # StableDiffusion3Pipeline's default max_sequence_length (zero rows without T5)


def vp_pipeline(cfg: DictConfig) -> Path:
    """The VP pipeline folder whose VAE, tokenizer, text encoder and UNet (the teacher) the flow
    model is built on: ``pipeline`` when set (e.g. a rebuilt VP model's), else the shipped one."""
    return Path(cfg.get("pipeline") or PIPELINE_DIR)


def build_transformer(cfg: DictConfig, latent_size: int = 16) -> SD3Transformer2DModel:
    """A fresh tiny SD3 transformer of the configured size (weights depend on ``cfg.seed`` alone)
    for ``latent_size``² latents (patch 2: (latent_size / 2)² image tokens; 16: the shipped v3 VAE's)."""
    f = cfg.flow
    if latent_size // 2 > f.pos_embed_max_size:
        raise ValueError(f"flow.pos_embed_max_size={f.pos_embed_max_size} is smaller than the {latent_size // 2} patches "
                         f"per side of {latent_size}² latents: set flow.pos_embed_max_size={latent_size // 2}")
    with initialised_with(cfg.seed):
        return SD3Transformer2DModel(
            sample_size=latent_size, patch_size=2, in_channels=4, out_channels=4, num_layers=f.layers,
            attention_head_dim=f.width // f.heads, num_attention_heads=f.heads,
            joint_attention_dim=JOINT_WIDTH, caption_projection_dim=f.width,
            pooled_projection_dim=2 * POOLED_WIDTH, pos_embed_max_size=f.pos_embed_max_size,
            qk_norm=f.qk_norm or None)


class CompactJointAttnProcessor:
    """diffusers' joint attention (JointAttnProcessor2_0's arithmetic) with an additive bias of
    log(``multiplicity``) on the key of the last context row: that row stands for ``multiplicity``
    identical rows (the zero T5 rows of a pipeline without T5)."""

    def __init__(self, multiplicity: int = T5_ROWS):
        self.log_m = math.log(multiplicity)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_m
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1]).to(q.dtype)
        x, c = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            c = attn.to_add_out(c)
        x = attn.to_out[1](attn.to_out[0](x))
        return x, c


def use_compact_context(transformer: SD3Transformer2DModel, multiplicity: int = T5_ROWS) -> None:
    """Set :class:`CompactJointAttnProcessor` on every joint attention of ``transformer``."""
    transformer.set_attn_processor(CompactJointAttnProcessor(multiplicity))


def compact_context(clip_states: torch.Tensor) -> torch.Tensor:
    """The training context: the 77 CLIP rows (width 256) and one zero row for the T5 rows."""
    return F.pad(clip_states, (0, 0, 0, 1))


def text_encoder_with_projection(pipeline_dir: Path, clip_dir: Path) -> CLIPTextModelWithProjection:
    """The VP pipeline's text encoder (fp32) with the bundled CLIP's text projection, as a
    CLIPTextModelWithProjection (float32, eval)."""
    from safetensors.torch import load_file

    tower = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", local_files_only=True, dtype=torch.float32)
    config = CLIPTextConfig(**{**tower.config.to_dict(), "projection_dim": POOLED_WIDTH})
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config)
    weights = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tower.state_dict().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) == {"text_projection.weight"}, (missing, unexpected)
    clip = load_file(clip_dir / "model.safetensors")
    with torch.no_grad():
        model.text_projection.weight.copy_(clip["text_projection.weight"].float())
    return model.float().eval()


class Teacher(torch.nn.Module):
    """The VP UNet (ε-prediction, SD's scaled-linear schedule) as the σ-space denoiser D(y, σ, c)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        from experiments.bundled_model.unet import SCHEDULE
        from diffusers import DDPMScheduler

        self.unet = unet.eval().requires_grad_(False)
        abar = DDPMScheduler(**SCHEDULE).alphas_cumprod.double()
        sigmas = ((1 - abar) / abar).sqrt()
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep of σ (linear in log σ between table entries)."""
        ls = self.log_sigmas
        x = sigma.log().clamp(float(ls[0]), float(ls[-1]))
        i = torch.searchsorted(ls, x).clamp(1, len(ls) - 1)
        lo, hi = ls[i - 1], ls[i]
        return (i - 1).to(x.dtype) + (x - lo) / (hi - lo)

    @torch.no_grad()
    def eps(self, y: torch.Tensor, sigma: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """ε̂ at (y, σ) with the VP text states (last hidden states, 77 × 128)."""
        s = sigma.view(-1, 1, 1, 1)
        return self.unet(y / (1 + s**2).sqrt(), self.timestep(sigma), encoder_hidden_states=states).sample

    def velocity(self, y: torch.Tensor, sigma: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The flow velocity whose denoiser is the teacher's: v = (x_t − D)/t = (1 + σ)·ε̂ − y."""
        return (1 + sigma.view(-1, 1, 1, 1)) * self.eps(y, sigma, states) - y


def logit_normal_t(n: int, gen: torch.Generator, mean: float, std: float, shift: float) -> torch.Tensor:
    """SD3's logit-normal flow times, then shifted: t' = s·t / (1 + (s − 1)·t) (σ' = s·σ)."""
    t = torch.sigmoid(mean + std * torch.randn(n, generator=gen))
    return shift * t / (1 + (shift - 1) * t)
