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

**The refiner** (``refiner``: a StableDiffusionXLImg2ImgPipeline folder such as
stable-diffusion-xl-refiner-1.0, or ``refiner_pipeline``: such a pipeline object). The base UNet
denoises the noisier part of the run and the refiner's UNet the rest, as diffusers' ensemble of
experts (the base's ``denoising_end`` = the refiner's ``denoising_start`` = ``refiner_switch``): the
base takes every evaluation whose model time is at or above the cutoff round(T − f·T) of the
training timesteps (T = 1000), the refiner every one below it; ``refiner_sigma`` puts the cut at a σ
instead (the refiner takes σ ≤ refiner_sigma). The hand-over is inside the denoiser, so the engine's
state, grid and history run straight through it and every solver works across it (a multistep
solver's history mixes the two networks' predictions; diffusers' refiner restarts its scheduler).
The refiner's conditioning is its own: CLIP-G's penultimate states and projected pooled embedding
from the refiner's ``text_encoder_2`` (with the same text edits), its empty-prompt rule, and time
ids (H, W, 0, 0, ``aesthetic_score``) — ``negative_aesthetic_score`` for the negative prompt —
when the refiner ``requires_aesthetics_score`` (else the base's six ids). The refiner must share the
base's latent space (channels, VAE factor) and training table; the base's VAE decodes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from framework.bases.embeddings import TextEdit
from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.models.families import ClipText, FamilyModel, check_pipeline, load_family, refiner_folder

#: The diffusers class of an SDXL refiner checkpoint.
REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"


class StableDiffusionXL(FamilyModel):
    """A diffusers StableDiffusionXLPipeline checkpoint, optionally with a refiner (module docstring)."""

    family = "sdxl"

    def __init__(self, path: str = "", allow_download: bool = False, variant: str | None = None, height: int | None = None,
                 width: int | None = None, prediction_type: str | None = None, pipeline: Any = None,
                 vae_slice: int | None = None, vae_tiling: bool = False, refiner: str | None = None,
                 refiner_switch: float = 0.8, refiner_sigma: float | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, refiner_pipeline: Any = None):
        if not 0 < refiner_switch < 1:
            raise ConfigError(f"model.refiner_switch must be in (0, 1) (diffusers' denoising_end), got {refiner_switch}")
        if refiner_sigma is not None and not refiner_sigma > 0:
            raise ConfigError(f"model.refiner_sigma must be > 0 (the refiner takes σ ≤ refiner_sigma), got {refiner_sigma}")
        if pipeline is None:
            pipeline = load_family("sdxl", path, allow_download, variant) if path else None
        else:
            check_pipeline(pipeline, "sdxl")
        if refiner_pipeline is None and refiner:
            refiner_folder(refiner, REFINER_CLASS, "an SDXL refiner")
            refiner_pipeline = load_family("sdxl_refiner", refiner, allow_download, variant)
        self.refiner = refiner_pipeline
        self.refiner_switch, self.refiner_sigma = float(refiner_switch), refiner_sigma
        self.aesthetic_score, self.negative_aesthetic_score = float(aesthetic_score), float(negative_aesthetic_score)
        self._compiled_refiner: Any = None
        self._negative_ids: torch.Tensor | None = None  # the negative prompt's refiner time ids of the last batch
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
        if self.refiner is not None:
            self._init_refiner(h, w)

    # -- the refiner -------------------------------------------------------------------------------
    def _init_refiner(self, h: int, w: int) -> None:
        ref = self.refiner
        if type(ref).__name__ != REFINER_CLASS:
            raise ConfigError(f"the refiner is a {type(ref).__name__}, not an SDXL refiner ({REFINER_CLASS})")
        if ref.text_encoder_2 is None or ref.unet is None:
            raise ConfigError("the SDXL refiner has no text_encoder_2 or unet: give a complete refiner folder")
        channels, factor = int(ref.unet.config.in_channels), int(ref.vae_scale_factor)
        if (channels, factor) != (self.latent_shape[0], int(self.pipe.vae_scale_factor)):
            raise ConfigError(f"the refiner's latents ({channels} channels, 1/{factor} of the image) are not the base's "
                              f"({self.latent_shape[0]} channels, 1/{int(self.pipe.vae_scale_factor)}): use the refiner of "
                              "this base model")
        table = ref.scheduler.alphas_cumprod
        if table.shape != self.alphas_cumprod.shape or not torch.allclose(table.double(), self.alphas_cumprod.double(), rtol=1e-6):
            raise ConfigError("the refiner's training noise table (scheduler betas) differs from the base's: use the refiner "
                              "of this base model")
        self.refiner_prediction = ref.scheduler.config.get("prediction_type", "epsilon")
        if self.refiner_prediction not in ("epsilon", "v_prediction"):
            raise ConfigError(f"the refiner's prediction_type '{self.refiner_prediction}' is not supported: epsilon or v_prediction")
        self.refiner_unet = ref.unet
        shared = ref.text_encoder_2 is self.pipe.text_encoder_2 and ref.tokenizer_2 is self.pipe.tokenizer_2
        self.refiner_text = None if shared else ClipText(ref.text_encoder_2, ref.tokenizer_2)
        self.refiner_zero_empty = bool(ref.config.get("force_zeros_for_empty_prompt", False))
        self.aesthetic = bool(ref.config.get("requires_aesthetics_score", False))
        size = [float(h), float(w), 0.0, 0.0]
        self.refiner_ids = size + ([self.aesthetic_score] if self.aesthetic else [float(h), float(w)])
        self.refiner_negative_ids = size + ([self.negative_aesthetic_score] if self.aesthetic else [float(h), float(w)])
        T = len(self.alphas_cumprod)
        self.refiner_cutoff = int(round(T - self.refiner_switch * T))   # diffusers' discrete_timestep_cutoff

    def base_at(self, sigma: float, timestep: float | None) -> bool:
        """Whether the base UNet (not the refiner) denoises at σ (and its model time)."""
        if self.refiner is None:
            return True
        if self.refiner_sigma is not None:
            return sigma > self.refiner_sigma
        return self.timestep_of(sigma, timestep) >= self.refiner_cutoff

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        super().setup(device, dtype)
        if self.refiner is not None and (self.refiner_unet.dtype != dtype or self.refiner_unet.device != device):
            self.refiner.to(device=device, dtype=dtype)

    def prepare_network(self, compile: bool = False, mode: str | None = None, channels_last: bool = False) -> None:
        """As Stable Diffusion's, for the refiner's UNet too."""
        from framework.models import compiled

        super().prepare_network(compile, mode, channels_last)
        if self.refiner is not None:
            compiled.set_channels_last(self.refiner_unet, channels_last)
            self._compiled_refiner = (compiled.compile_network(self.refiner_unet, compiled.resolve_mode(mode, self.device),
                                                               self.device, self.refiner_unet.dtype) if compile else None)

    def check_perturbation(self, perturbation: Any) -> None:
        if self.refiner is not None:
            raise ConfigError(f"perturbation guidance ({perturbation.kind}) acts on the base UNet's layers, and model.refiner "
                              "hands part of the run to another UNet: remove the refiner or the perturbation plugin")
        super().check_perturbation(perturbation)

    @hookimpl
    def predict(self, state, x, sigma, cond):
        """The model's predict; with an aesthetic-score refiner, the negative prompt's refiner time ids
        carry ``negative_aesthetic_score`` (diffusers' add_neg_time_ids), set once per batch."""
        ids = None if self.refiner is None or cond is None or cond.uncond is None else cond.uncond.get("refiner_time_ids")
        if ids is not None and ids is not self._negative_ids:  # once per batch, no host sync in the steps
            self._negative_ids = torch.tensor([self.refiner_negative_ids] * ids.shape[0], dtype=ids.dtype, device=ids.device)
            cond.uncond["refiner_time_ids"] = self._negative_ids
        return super().predict(state=state, x=x, sigma=sigma, cond=cond)

    # -- conditioning and the network ---------------------------------------------------------------
    def encode_edited(self, prompts: Sequence[str], edits: Sequence[TextEdit]) -> dict[str, torch.Tensor]:
        states_l, _ = self.text_l.encode_pooled(prompts, edits)
        states_g, pooled = self.text_g.encode_pooled(prompts, edits)
        states = torch.cat([states_l, states_g], dim=-1)
        empty = torch.tensor([p != "" for p in prompts], device=states.device)
        if self.zero_empty:
            states, pooled_base = states * empty[:, None, None], pooled * empty[:, None]
        else:
            pooled_base = pooled
        time_ids = torch.tensor([self.time_ids] * len(prompts), device=states.device)
        out = {"encoder_hidden_states": states.to(self.dtype), "text_embeds": pooled_base.to(self.dtype),
               "time_ids": time_ids.to(self.dtype)}
        if self.refiner is not None:
            r_states, r_pooled = (states_g, pooled) if self.refiner_text is None else self.refiner_text.encode_pooled(prompts, edits)
            if self.refiner_zero_empty:
                r_states, r_pooled = r_states * empty[:, None, None], r_pooled * empty[:, None]
            ids = torch.tensor([self.refiner_ids] * len(prompts), device=states.device)
            out.update(refiner_hidden_states=r_states.to(self.dtype), refiner_text_embeds=r_pooled.to(self.dtype),
                       refiner_time_ids=ids.to(self.dtype))
        return out

    def denoise_batch(self, x, sigma, timestep, tensors):
        if not self.base_at(sigma, timestep):
            return self._refine(x, sigma, timestep, tensors)
        added = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]}
        return super().denoise_batch(x, sigma, timestep, {"encoder_hidden_states": tensors["encoder_hidden_states"],
                                                         "added_cond_kwargs": added})

    def _refine(self, x, sigma, timestep, tensors):
        """D(x, σ) from the refiner's UNet (the base's VP arithmetic, the refiner's prediction type)."""
        added = {"text_embeds": tensors["refiner_text_embeds"], "time_ids": tensors["refiner_time_ids"]}
        return self.unet_denoised(self.network_for_call(self.refiner_unet, self._compiled_refiner), self.refiner_prediction,
                                  x, sigma, timestep, {"encoder_hidden_states": tensors["refiner_hidden_states"],
                                                       "added_cond_kwargs": added})
