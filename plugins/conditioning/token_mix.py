"""Mix token embeddings: every occurrence of ``token`` gets Σ wᵢ·e(tokensᵢ).

The Stable Diffusion deep dive's embedding mix at the input of the text encoder: e.g. ``red`` →
0.5·e(red) + 0.5·e(blue) (positions unchanged). Weights are used as given, not renormalised.
``encoders`` (all, clip, t5) chooses the text encoders it edits on SD3 and Flux (T5: one-piece words).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from framework.plugin import ApplyTo, ConfigError, EditPlugin, TextEmbeddings, TextEncoders, mix_tokens


@dataclass
class TokenMix(EditPlugin):
    token: str = "red"
    tokens: list[str] = field(default_factory=lambda: ["red", "blue"])
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    apply_to: ApplyTo = ApplyTo.both
    encoders: TextEncoders = TextEncoders.all

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.weights):
            raise ConfigError(
                f"conditioning.token_mix needs one weight per token, got {len(self.tokens)} tokens and "
                f"{len(self.weights)} weights: e.g. tokens=[red,blue] weights=[0.5,0.5]"
            )

    def edit_inputs(self, inputs, emb: TextEmbeddings):
        return mix_tokens(inputs, emb, self.token, list(zip(self.tokens, self.weights)))
