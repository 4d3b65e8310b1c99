"""Skip-layer guidance, SLG (Stability AI's SD3.5 recipe; as spatiotemporal skip guidance, STG, in
Hyung et al. 2024): a second conditional evaluation with the chosen transformer blocks skipped (each
returns its input), and D ← D + scale·(D_c − D_skip) — after ``cfg``:
D_u + s·(D_c − D_u) + scale·(D_c − D_skip), diffusers' SkipLayerGuidance. By default only in a window
of the steps (diffusers' and SD3.5's 0.01–0.2); SD3.5 Medium's layers are [7, 8, 9].

Window note: diffusers' SkipLayerGuidance and PerturbedAttentionGuidance enable the branch for
⌊start·N⌋ < i < ⌊stop·N⌋ (start excluded); samplerlab's window includes its start step, as
diffusers' own CFG window does.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import Perturbation, PerturbationGuidance


@dataclass
class SLG(PerturbationGuidance):
    scale: float = 2.8
    layers: list[int] | None = None
    start: float = 0.01
    stop: float = 0.2

    branch = "slg"

    def perturbation(self, layers):
        return Perturbation("skip_blocks", layers)
