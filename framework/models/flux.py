"""``model=flux``: a Flux checkpoint (FluxPipeline folder) as a samplerlab model.

A flow-matching transformer (:class:`framework.models.families.FlowFamily`). The sampler's state is
the ordinary latent grid (B, 16, h, w); each evaluation packs it into 2×2 patches (B, h·w/4, 64)
with their position ids, as the pipeline does, and unpacks the velocity. The network gets t itself
(the pipeline divides the scheduler's 1000·t by 1000). Conditioning: T5's last hidden states
(``max_sequence_length`` 512) and CLIP-L's pooled output.

**Guidance-distilled.** FLUX.1-dev takes its guidance strength as a network input,
``flux_guidance`` (3.5, the pipeline's ``guidance_scale``), embedded like the timestep; there is no
classifier-free guidance by default, so ``model=flux`` selects ``guidance=[]``. CFG-family plugins
(``cfg``, ``apg``, ``cfg_rescale``, ``interval``, the CFG++ solvers) need ``model.true_cfg=true``:
then they combine a negative-prompt pass with the prompt's, both at the same distilled guidance,
as diffusers' ``true_cfg_scale`` (``cfg_scale`` is that scale); without it a run that asks for the
unconditional pass is refused with one line. A checkpoint without guidance embedding (FLUX.1-schnell)
ignores ``flux_guidance``.

Text edits act on CLIP-L's tokens (so on the pooled vector) and on T5's (``encoders``: all, clip,
t5). Edits of the hidden states (``prompt_mix``, ``prompt_weighting``) restricted to CLIP
(``encoders=clip``) are refused: Flux does not read CLIP's states.

The default grid is the pipeline's (``schedule=flow_match``: ``sigmas = linspace(1, 1/N, N)``
shifted by e^μ, μ linear in the (H/16)·(W/16) packed tokens). The pipeline's default image size is
1024² whatever the transformer; so is this adapter's.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from framework.bases.embeddings import T5Embeddings, TextEdit
from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.models.families import ClipText, FlowFamily, check_pipeline, load_family, t5_states
from framework.models.reference_loops import latent_image_ids, pack_latents, unpack_latents

#: The pipeline's default image size (``default_sample_size`` 128 × the VAE's 8).
DEFAULT_SIZE = 1024


class Flux(FlowFamily):
    """A diffusers FluxPipeline checkpoint."""

    family = "flux"
    flow_grid = "linspace"

    def __init__(self, path: str = "", allow_download: bool = False, variant: str | None = None, height: int | None = None,
                 width: int | None = None, flux_guidance: float = 3.5, true_cfg: bool = False, max_sequence_length: int = 512,
                 shift: float | None = None, pipeline: Any = None, vae_slice: int | None = None, vae_tiling: bool = False):
        if max_sequence_length < 1:
            raise ConfigError(f"model.max_sequence_length must be ≥ 1 (T5 tokens), got {max_sequence_length}")
        self.flux_guidance, self.true_cfg = float(flux_guidance), true_cfg
        self.max_sequence_length, self._shift = max_sequence_length, shift
        if pipeline is None and path:
            pipeline = load_family("flux", path, allow_download, variant)
        elif pipeline is not None:
            check_pipeline(pipeline, "flux")
        super().__init__(path=path, allow_download=allow_download, variant=variant, height=height, width=width,
                         pipeline=pipeline, vae_slice=vae_slice, vae_tiling=vae_tiling)

    def _init_from_pipe(self) -> None:
        pipe = self.pipe
        h, w, factor = self.image_size(DEFAULT_SIZE)
        self.latent_shape = (pipe.transformer.config.in_channels // 4, h // factor, w // factor)
        self.flow_setup(self._shift)
        self.text_l = ClipText(pipe.text_encoder, pipe.tokenizer, layer=-1)
        self.t5 = T5Embeddings(pipe.text_encoder_2, pipe.tokenizer_2, self.max_sequence_length)
        self.distilled = bool(pipe.transformer.config.guidance_embeds)
        self._ids: tuple[torch.Tensor, ...] = ()

    def image_seq_len(self) -> int:
        return (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)

    text_encoder_kinds = ("clip", "t5")

    @hookimpl
    def configure(self, run) -> None:
        """Text edits of the hidden states (prompt_mix, prompt_weighting) restricted to CLIP
        (``encoders=clip``) would change nothing: Flux reads CLIP's pooled vector and T5's states only."""
        outputs = [e.name for e in run.plugins.by_group("conditioning")
                   if isinstance(e.obj, TextEdit) and type(e.obj).edit_outputs is not TextEdit.edit_outputs
                   and e.obj.encoders == "clip"]
        if outputs:
            names = ", ".join(outputs)
            raise ConfigError(f"conditioning {names} edits CLIP's hidden states, which model=flux does not use "
                              f"(it reads CLIP's pooled vector and T5's states): set encoders=all or t5, or remove {names}")

    @hookimpl
    def run_start(self, run) -> None:
        if run.needs_uncond and not self.true_cfg:
            raise ConfigError("model=flux is guidance-distilled (its guidance is model.flux_guidance): a CFG plugin asked for "
                              "a negative-prompt pass; remove it (guidance=[]), or set model.true_cfg=true for true CFG")

    def encode_edited(self, prompts: Sequence[str], edits: Sequence[TextEdit]) -> dict[str, torch.Tensor]:
        _, pooled = self.text_l.encode_pooled(prompts, edits)
        states = t5_states(self.t5, prompts, edits)
        return {"encoder_hidden_states": states.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def position_ids(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(text ids (L, 3) of zeros, image ids (h·w/4, 3)) in the run's dtype, made once per run."""
        if not self._ids or self._ids[0].shape[0] != length or self._ids[0].device != device or self._ids[0].dtype != self.dtype:
            txt = torch.zeros(length, 3, dtype=self.dtype, device=device)
            self._ids = (txt, latent_image_ids(*self.latent_shape[1:]).to(device, self.dtype))
        return self._ids[0], self._ids[1]

    def network_velocity(self, x_in, timestep, tensors):
        b, (_, h, w) = x_in.shape[0], self.latent_shape
        txt_ids, img_ids = self.position_ids(tensors["encoder_hidden_states"].shape[1], x_in.device)
        guidance = torch.full([1], self.flux_guidance, dtype=torch.float32, device=x_in.device).expand(b) if self.distilled else None
        v = self.network_for_call(self.unet)(
            hidden_states=pack_latents(x_in), timestep=timestep.expand(b).to(x_in.dtype) / 1000, guidance=guidance,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False, **tensors)[0]
        return unpack_latents(v, h, w)
