"""Prompt accuracy under the bundled judge (framework/bundled/judge.py), the independent measure of
prompt-following on the bundled world: for every sample whose prompt names a colour (shape) of
the world, is the judge's colour (shape) of the main object the prompted one? Reports
``prompt_accuracy_colour`` and ``prompt_accuracy_shape`` (fractions over the samples whose prompt
names one; the first colour/shape word of a prompt is its main object's), and the counts.
Images are judged as they are made (batch_end), so memory does not grow with the run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from framework.plugin import ConfigError, bundled, hookimpl, world


def first_word(prompt: str, vocabulary: tuple[str, ...]) -> str | None:
    for word in prompt.lower().replace(",", " ").split():
        if word in vocabulary:
            return word
    return None


@dataclass
class _Tally:
    """A run's judge and its counts (in the run's stash)."""

    judge: Any
    hits: dict[str, int] = field(default_factory=lambda: {"colour": 0, "shape": 0})
    total: dict[str, int] = field(default_factory=lambda: {"colour": 0, "shape": 0})


@dataclass
class PromptAccuracy:
    def tally(self, run) -> _Tally:
        return run.stash.get(self, lambda: _Tally(bundled.load_judge()))

    @hookimpl
    def configure(self, run):
        if not run.model.has_decoder:
            raise ConfigError("prompt_accuracy judges images but this model has no decoder: use model=bundled")
        self.tally(run)

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        tally = self.tally(run)
        with torch.no_grad():
            pred = tally.judge.predict(images.float().cpu() * 2 - 1)
        for k, prompt in enumerate(batch.cond.prompts if batch.cond is not None else []):
            for head, vocab in (("colour", world.COLOURS), ("shape", world.SHAPES)):
                word = first_word(prompt, vocab)
                if word is not None:
                    tally.total[head] += 1
                    tally.hits[head] += int(vocab[int(pred[head][k])] == word)

    @hookimpl
    def run_end(self, run, result):
        tally = self.tally(run)
        for head in ("colour", "shape"):
            n = tally.total[head]
            run.metrics[f"prompt_accuracy_{head}_n"] = float(n)
            if n:
                run.metrics[f"prompt_accuracy_{head}"] = tally.hits[head] / n
