"""Mix the output embeddings of the prompts with those of a second prompt.

The deep dive's prompt mix: encoder_hidden_states ← (1 − w)·E(prompt) + w·E(``prompt``), token by
token (both padded to 77). The second prompt is encoded with the run's other edit plugins (token
edits, textual inversion, prompt weighting), but not with other prompt mixes. Prompts only: the
negative prompt is left as it is. ``encoders`` (all, clip, t5) chooses the encoders whose states
are mixed on SD3 and Flux (T5's states of the two prompts, token by token).
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import ConfigError, EditPlugin, TextEmbeddings, TextEncoders, mix_outputs


@dataclass
class PromptMix(EditPlugin):
    prompt: str = ""
    weight: float = 0.5
    encoders: TextEncoders = TextEncoders.all

    apply_to = "cond"

    def edit_outputs(self, hidden, inputs, emb: TextEmbeddings, edits):
        others = [e for e in edits if not isinstance(e, PromptMix)]
        second = emb.encode([self.prompt] * hidden.shape[0], others)
        return mix_outputs(hidden, second, self.weight)

    def check(self, run):
        if not self.prompt:
            raise ConfigError("conditioning.prompt_mix.prompt is empty: e.g. conditioning.prompt_mix.prompt='a blue circle'")
