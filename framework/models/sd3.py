"""``model=sd3``: a Stable Diffusion 3 checkpoint (StableDiffusion3Pipeline folder) as a samplerlab model.

A flow-matching transformer (:class:`framework.models.families.FlowFamily`: σ-space arithmetic,
the checkpoint's shift, the training table); the network gets x_t and the timestep 1000·t. Its
conditioning, as the pipeline makes it:

- CLIP-L and CLIP-G (both with projection): penultimate hidden states concatenated on features,
  zero-padded to T5's width and joined along the sequence with T5's last hidden states (padded to
  ``max_sequence_length``, 256): ``encoder_hidden_states`` (77 + 256 tokens);
- the projected pooled embeddings of both CLIPs, concatenated: ``pooled_projections``;
- ``use_t5=false`` (or a folder saved without T5, which then needs it) puts zeros in T5's place,
  as diffusers does without T5; the empty negative prompt is encoded like any prompt.

The default grid is the pipeline's (``schedule=flow_match``: FlowMatchEuler's ``set_timesteps(N)``,
from t = 1, σ = ∞); μ of a dynamically shifted config counts (H/p)·(W/p) patches (for a config without
``max_shift``, e.g. DPMSolverMultistep's under ``solver=diffusers``, the pipeline's fallback 1.16).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from framework.bases.embeddings import TextEdit
from framework.bases.embeddings import T5Embeddings
from framework.models.families import ClipText, FlowFamily, check_pipeline, load_family, missing_t5, t5_states
from framework.core.errors import ConfigError


class StableDiffusion3(FlowFamily):
    """A diffusers StableDiffusion3Pipeline checkpoint."""

    family = "sd3"
    max_shift_fallback = 1.16

    def __init__(self, path: str = "", allow_download: bool = False, variant: str | None = None, height: int | None = None,
                 width: int | None = None, use_t5: bool = True, max_sequence_length: int = 256, shift: float | None = None,
                 pipeline: Any = None, vae_slice: int | None = None, vae_tiling: bool = False):
        if max_sequence_length < 1:
            raise ConfigError(f"model.max_sequence_length must be ≥ 1 (T5 tokens), got {max_sequence_length}")
        self.use_t5, self.max_sequence_length, self._shift = use_t5, max_sequence_length, shift
        if pipeline is None and path:
            pipeline = load_family("sd3", path, allow_download, variant, () if use_t5 else ("text_encoder_3", "tokenizer_3"))
        elif pipeline is not None:
            check_pipeline(pipeline, "sd3")
            if use_t5 and pipeline.text_encoder_3 is None:
                raise ConfigError(missing_t5("sd3", "the given pipeline"))
        super().__init__(path=path, allow_download=allow_download, variant=variant, height=height, width=width,
                         pipeline=pipeline, vae_slice=vae_slice, vae_tiling=vae_tiling)

    def _init_from_pipe(self) -> None:
        pipe = self.pipe
        h, w, factor = self.image_size(pipe.transformer.config.sample_size * int(pipe.vae_scale_factor))
        self.latent_shape = (pipe.transformer.config.in_channels, h // factor, w // factor)
        self.flow_setup(self._shift)
        self.text_l = ClipText(pipe.text_encoder, pipe.tokenizer)
        self.text_g = ClipText(pipe.text_encoder_2, pipe.tokenizer_2)
        self.t5 = T5Embeddings(pipe.text_encoder_3, pipe.tokenizer_3, self.max_sequence_length) if self.use_t5 else None
        self.text_encoder_kinds = ("clip", "t5") if self.use_t5 else ("clip",)
        self.t5_width = int(pipe.transformer.config.joint_attention_dim)

    def image_seq_len(self) -> int:
        p = int(self.pipe.transformer.config.patch_size)
        return (self.latent_shape[1] // p) * (self.latent_shape[2] // p)

    def encode_edited(self, prompts: Sequence[str], edits: Sequence[TextEdit]) -> dict[str, torch.Tensor]:
        states_l, pooled_l = self.text_l.encode_pooled(prompts, edits)
        states_g, pooled_g = self.text_g.encode_pooled(prompts, edits)
        if self.t5 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.t5_width, dtype=states_l.dtype, device=states_l.device)
        else:
            t5 = t5_states(self.t5, prompts, edits)
        clip = torch.cat([states_l, states_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(self.dtype),
                "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1).to(self.dtype)}

    def network_velocity(self, x_in, timestep, tensors):
        net = self.network_for_call(self.unet)
        return net(hidden_states=x_in, timestep=timestep.expand(x_in.shape[0]), return_dict=False, **tensors)[0]
