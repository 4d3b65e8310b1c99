"""Replace a token's input embedding by another token's, or by a vector from a file.

The Stable Diffusion deep dive's token swap: every occurrence of ``source`` in the prompt keeps its
position embedding but gets the token embedding of ``target`` (or, with ``vector``, the first
vector of an embedding file that :func:`framework.bases.embeddings.load_embeddings` reads). ``red`` →
``blue`` turns "a red circle" into a blue one without changing the prompt's text. ``encoders`` (all,
clip, t5) chooses the text encoders it edits on SD3 and Flux; on T5 both words must be one
SentencePiece piece (``red`` → ``▁red``), and the swap equals writing the other word when they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from framework.plugin import ApplyTo, EditPlugin, TextEmbeddings, TextEncoders, load_embeddings, replace_token


@dataclass
class TokenSwap(EditPlugin):
    input_files: ClassVar[tuple[str, ...]] = ("vector",)  # read by content into the run key
    source: str = "red"
    target: str = "blue"
    vector: str | None = None  # an embedding file; its first vector replaces ``source`` (target is then unused)
    apply_to: ApplyTo = ApplyTo.both
    encoders: TextEncoders = TextEncoders.all

    def edit_inputs(self, inputs, emb: TextEmbeddings):
        if self.vector:
            target = next(iter(load_embeddings(self.vector).values()))[0]
            return replace_token(inputs, emb, self.source, emb.vector(target))
        return replace_token(inputs, emb, self.source, self.target)
