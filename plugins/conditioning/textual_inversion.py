"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): use learned token embeddings.

``path`` is a diffusers ``learned_embeds.safetensors``/``.bin`` (or its folder) or an A1111
``.pt``/``.safetensors`` file; its token (``token`` renames it) is recognised in prompts and
negative prompts and its vectors take those positions in the input embeddings, as diffusers'
``load_textual_inversion`` does — without adding the token to the shared tokenizer. Train one with
``python -m experiments.textual_inversion``. An SDXL embedding file (``clip_l`` and ``clip_g`` vector
sets, named after the file or ``token``) gives each CLIP encoder of SDXL/SD3 the set of its width.
CLIP only (``encoders`` must be clip): T5 reads the token's name as text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from framework.plugin import ApplyTo, ConfigError, EditPlugin, TextEmbeddings, TextEncoders, load_embeddings


@dataclass
class TextualInversion(EditPlugin):
    input_files: ClassVar[tuple[str, ...]] = ("path",)  # read by content into the run key
    path: str | None = None
    token: str | None = None
    apply_to: ApplyTo = ApplyTo.both
    encoders: TextEncoders = TextEncoders.clip

    not_on_t5 = "textual inversion vectors are CLIP token embeddings"

    def new_tokens(self, emb: TextEmbeddings):
        if not self.path:
            raise ConfigError("conditioning.textual_inversion.path is empty: give a learned_embeds.safetensors (or A1111 .pt)")
        found = load_embeddings(self.path)
        if set(found) == {"clip_l", "clip_g"}:  # SDXL's format: one token, a vector set per CLIP encoder
            name = self.token or Path(self.path).stem
            found = {name: v for v in found.values() if v.shape[-1] == emb.width} or {name: found["clip_l"]}
        elif self.token is not None:
            found = load_embeddings(self.path, self.token)
        for name, vecs in found.items():
            if vecs.shape[-1] != emb.width:
                raise ConfigError(
                    f"embedding '{name}' in {self.path} has width {vecs.shape[-1]} but this text encoder's is {emb.width}: "
                    "it was trained for another model"
                )
        return found

    def check(self, run):
        self.new_tokens(TextEmbeddings.of(run.model))  # fail before sampling
