"""``model=sdxl``: a Stable Diffusion XL checkpoint (StableDiffusionXLPipeline folder) as a samplerlab model.

The VP arithmetic is Stable Diffusion's (:mod:`framework.models.diffusers_sd`: ε- or v-prediction
read from the scheduler config, the same 1000-step training table); only the conditioning differs:

- the penultimate hidden states of CLIP-L and CLIP-G, concatenated on features
  (``encoder_hidden_states``, 768 + 1280 wide);
- CLIP-G's projected pooled embedding (``text_embeds``) and the six size/crop ids
  (original H, W, crop top, left, target H, W = H, W, 0, 0, H, W: ``time_ids``), which the UNet adds to
  its time embedding;
- the empty prompt (the default negative prompt) encodes to zeros, states and pooled, where the
  checkpoint says ``force_zeros_for_empty_prompt`` (SDXL base does), as the pipeline's
  unconditional input without a negative prompt.

Text edits (conditioning plugins) act on both CLIP encoders.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from framework.bases.embeddings import TextEdit
from framework.models.families import ClipText, FamilyModel, check_pipeline, load_family


class StableDiffusionXL(FamilyModel):
    """A diffusers StableDiffusionXLPipeline checkpoint."""

    family = "sdxl"

    def __init__(self, path: str = "", allow_download: bool = False, variant: str | None = None, height: int | None = None,
                 width: int | None = None, prediction_type: str | None = None, pipeline: Any = None,
                 vae_slice: int | None = None, vae_tiling: bool = False):
        if pipeline is None:
            pipeline = load_family("sdxl", path, allow_download, variant) if path else None
        else:
            check_pipeline(pipeline, "sdxl")
        super().__init__(path=path, allow_download=allow_download, variant=variant, height=height, width=width,
                         prediction_type=prediction_type, pipeline=pipeline, vae_slice=vae_slice, vae_tiling=vae_tiling)

    def _init_from_pipe(self) -> None:
        super()._init_from_pipe()  # Stable Diffusion's: the VP table, prediction type, latent shape
        factor = int(self.pipe.vae_scale_factor)
        h, w = self.latent_shape[1] * factor, self.latent_shape[2] * factor
        self.text_l = ClipText(self.pipe.text_encoder, self.pipe.tokenizer)
        self.text_g = ClipText(self.pipe.text_encoder_2, self.pipe.tokenizer_2)
        self.zero_empty = bool(self.pipe.config.get("force_zeros_for_empty_prompt", False))
        self.time_ids = [float(h), float(w), 0.0, 0.0, float(h), float(w)]

    def encode_edited(self, prompts: Sequence[str], edits: Sequence[TextEdit]) -> dict[str, torch.Tensor]:
        states_l, _ = self.text_l.encode_pooled(prompts, edits)
        states_g, pooled = self.text_g.encode_pooled(prompts, edits)
        states = torch.cat([states_l, states_g], dim=-1)
        if self.zero_empty:
            keep = torch.tensor([p != "" for p in prompts], device=states.device)
            states, pooled = states * keep[:, None, None], pooled * keep[:, None]
        time_ids = torch.tensor([self.time_ids] * len(prompts), device=states.device)
        return {"encoder_hidden_states": states.to(self.dtype), "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.to(self.dtype)}

    def denoise_batch(self, x, sigma, timestep, tensors):
        added = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]}
        return super().denoise_batch(x, sigma, timestep, {"encoder_hidden_states": tensors["encoder_hidden_states"],
                                                         "added_cond_kwargs": added})
