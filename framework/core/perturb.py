"""Perturbed evaluations of the network: what a guidance plugin asks the model adapter for.

A plugin declares, in ``configure``, an extra *branch* of every evaluation
(``run.request_branch(name, Perturbation(...))``): the network evaluated once more at the same
(x, σ), with the prompt or the negative prompt, and with a :class:`Perturbation` applied inside it —
to that branch only, removed afterwards (also when the evaluation raises). The adapter puts the
branch in the same network call as the CFG pair when it can apply the perturbation to a slice of
the batch (the diffusers adapters can, for every kind), else it makes a separate call; the branch's
denoised comes back as ``pred.branches[name]``. A branch may instead (or also) carry a prompt of its
own (``run.request_branch(name, text="...")``): encoded once per batch by the model's
``encode_prompts`` and stacked with the CFG pair (Perp-Neg, dual CFG, regional and timed prompts).

Layers are numbered per model: ``model.perturbation_layers()`` lists them (for diffusers networks
the transformer blocks in module order: a UNet's BasicTransformerBlocks down → mid → up, SD3's
``transformer_blocks``, Flux's ``transformer_blocks`` then ``single_transformer_blocks``). A kind
acts in the chosen blocks:

- ``identity_attention`` — self-attention's score matrix replaced by the identity (its output is
  the value projection): PAG (Ahn et al. 2024), diffusers' ``skip_attention_scores``;
- ``blur_attention`` — the self-attention query blurred by a Gaussian of ``blur_sigma`` tokens on
  the image grid (∞: the mean over tokens, i.e. uniform attention): SEG (Hong 2024);
- ``skip_blocks`` — the whole block skipped (its output is its input): SLG / STG, and diffusers'
  AutoGuidance layer-skip approximation;
- ``drop_text_attention`` — cross-attention to the text replaced by zeros (UNets); in SD3's and
  Flux's joint attention, the image tokens' queries do not attend to the text tokens' keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from framework.core.errors import ConfigError
from framework.core.settings import Choice


class PerturbKind(Choice):
    identity_attention = "identity_attention"
    blur_attention = "blur_attention"
    skip_blocks = "skip_blocks"
    drop_text_attention = "drop_text_attention"


class BranchPrompt(Choice):
    cond = "cond"  # the prompt's conditioning (PAG, SEG, SLG)
    uncond = "uncond"  # the negative prompt's (diffusers' AutoGuidance)


@dataclass(frozen=True)
class Perturbation:
    """A change inside the network for one branch: ``kind`` in ``layers`` (model layer indices)."""

    kind: PerturbKind
    layers: tuple[int, ...]
    blur_sigma: float = math.inf  # blur_attention only: the Gaussian's σ in tokens (∞: the mean)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", PerturbKind(str(self.kind)))
        except ValueError:
            raise ConfigError(f"unknown perturbation '{self.kind}': use one of {', '.join(k.value for k in PerturbKind)}") from None
        try:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        except TypeError:
            raise ConfigError(f"perturbation layers must be a non-empty list of layer indices, got {self.layers!r}") from None
        if not layers or any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
            raise ConfigError(f"perturbation layers must be a non-empty list of layer indices, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if not self.blur_sigma > 0:
            raise ConfigError(f"blur_sigma must be > 0 tokens (or inf: the mean), got {self.blur_sigma}")


@dataclass(frozen=True)
class Branch:
    """An extra branch of every evaluation, requested by a plugin: evaluated where ``when(state,
    sigma)`` is true (always without it), with the prompt (``cond``) or the negative prompt, or
    with a prompt of its own (``text``: encoded once per batch by the model's ``encode_prompts``,
    the same text for every sample), perturbed by ``perturbation`` or not (None: a plain
    evaluation on its prompt, e.g. Perp-Neg's negative, regional and timed prompts)."""

    name: str
    perturbation: Perturbation | None
    prompt: BranchPrompt = BranchPrompt.cond
    when: Callable[[Any, float], bool] | None = None
    text: str | None = None

    def active(self, state: Any, sigma: float) -> bool:
        return self.when is None or bool(self.when(state, sigma))


#: The record's NFE convention for ``nfe_pairs`` (docs/records.md).
NFE_CONVENTION = ("nfe_pairs = network inputs per sample / 2: a CFG pair (prompt + negative prompt) is 1 NFE, "
                  "a pair plus one perturbed branch 1.5, a lone conditional evaluation 0.5; "
                  "a separate guide network's evaluation (autoguidance_model) is one more call and input, "
                  "its share in guide_inputs")
