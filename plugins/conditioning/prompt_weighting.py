"""Prompt weighting in AUTOMATIC1111's syntax: ``(word:1.3)``, ``(word)`` = ×1.1, ``[word]`` = ÷1.1.

The syntax is stripped before tokenising (nesting multiplies; ``\\(`` is a literal bracket); the
prompt is encoded unweighted, then each token's output embedding is multiplied by its weight and,
with ``normalize`` (A1111's behaviour), the prompt's embedding is rescaled so that its mean over
tokens and channels is unchanged (per prompt here; A1111 per batch). Prompts longer than 75 tokens
are truncated, not split into 75-token chunks as A1111 does; ``BREAK`` is not special. On T5 (SD3,
Flux; ``encoders`` all or t5) each T5 token gets the weight of the first character it spans.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import ApplyTo, EditPlugin, TextEmbeddings, TextEncoders, apply_prompt_weights


@dataclass
class PromptWeighting(EditPlugin):
    normalize: bool = True
    apply_to: ApplyTo = ApplyTo.both  # the negative prompt's weights are read too
    encoders: TextEncoders = TextEncoders.all

    parses_weights = True

    def edit_outputs(self, hidden, inputs, emb: TextEmbeddings, edits):
        return apply_prompt_weights(hidden, inputs.weights, self.normalize)
