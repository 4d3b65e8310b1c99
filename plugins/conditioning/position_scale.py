"""Scale the position embeddings of a range of positions (the deep dive's position-embedding edit).

The text encoder's input is token embedding + position embedding; this multiplies the position
part of positions ``start:end`` (0 = start-of-text; ``end`` null = to the end) by ``scale``:
0 removes word order there, 1 is the identity. Applies to the prompts only by default. CLIP only:
T5 (SD3, Flux) has no position embeddings (relative attention biases), so ``encoders`` must be clip.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import ApplyTo, EditPlugin, TextEmbeddings, TextEncoders, scale_positions


@dataclass
class PositionScale(EditPlugin):
    scale: float = 0.5
    start: int = 0
    end: int | None = None
    apply_to: ApplyTo = ApplyTo.cond
    encoders: TextEncoders = TextEncoders.clip

    not_on_t5 = "T5 has no position embeddings: its attention has relative position biases"

    def edit_inputs(self, inputs, emb: TextEmbeddings):
        return scale_positions(inputs, self.scale, self.start, self.end)
