"""Perturbed-attention guidance, PAG (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance"): a second conditional evaluation with the self-attention map of the
chosen layers replaced by the identity (each token attends only to itself, so the attention output
is the value projection), and D ← D + scale·(D_c − D_pert) — with ``cfg`` first, the paper's
combined rule D = D_u + s·(D_c − D_u) + scale·(D_c − D_pert) (eq. 11; diffusers'
PerturbedAttentionGuidance), without it D_c + scale·(D_c − D_pert) (eq. 10).

The perturbed branch is batched with the CFG pair (one network call of 3 inputs: 1.5 NFE in the
CFG-pair convention). ``layers``: indices of the model's transformer blocks (null: the mid block);
``start``/``stop``: the window as fractions of the steps (framework/bases/perturbation.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import Perturbation, PerturbationGuidance


@dataclass
class PAG(PerturbationGuidance):
    scale: float = 3.0
    layers: list[int] | None = None
    start: float = 0.0
    stop: float = 1.0

    branch = "pag"

    def perturbation(self, layers):
        return Perturbation("identity_attention", layers)
