"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm: Transform 2D
Diffusion into 3D, alleviate Janus problem and Beyond", eq. 6–7): guide towards the prompt and away
from only the part of a negative prompt that is perpendicular to the prompt's direction, so a
negative that overlaps the prompt does not erase it. With D_u the unconditional prediction (the
run's ``negative_prompt``: the paper's empty prompt, ""), D_c the prompt's, D_n the ``negative``
prompt's (a prompt branch of every evaluation), s = ``cfg_scale`` and w = ``neg_scale``:

    Δ_c = D_c − D_u,   Δ_n = D_n − D_u,   Δ_n^⊥ = Δ_n − (⟨Δ_n, Δ_c⟩ / ‖Δ_c‖²)·Δ_c
    D = D_u + s·Δ_c − w·Δ_n^⊥

per sample (the inner products over all of a sample's latent). The paper writes it in ε; the
differences in ε are those in D times −1/σ (and the v and flow velocities' are affine in D at a
fixed x), and Δ_n^⊥ is unchanged by scaling both, so the rule is the same in D. ComfyUI's
PerpNeg/PerpNegGuider compute D_u + s·(Δ_c − w'·Δ_n^⊥) with the projection over the whole batch:
w = s·w' (and batch size 1) gives theirs.

Write it instead of ``cfg`` (it is the CFG combiner): ``guidance=[perp_neg]``, 3 network inputs
per sample (1.5 NFE in the CFG-pair convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import UncondGuidance, flat_dot, hookimpl
from plugins.guidance.prompt_branch import check_last, check_prompt


def perp_neg(cond: torch.Tensor, uncond: torch.Tensor, negative: torch.Tensor, scale: float, neg_scale: float) -> torch.Tensor:
    """D_u + s·Δ_c − w·Δ_n^⊥ per sample (module docstring), computed in float64."""
    c, u, n = cond.double(), uncond.double(), negative.double()
    dc, dn = c - u, n - u
    norm2 = flat_dot(dc, dc).clamp_min(1e-30)
    perp = dn - flat_dot(dn, dc) / norm2 * dc
    return (u + scale * dc - neg_scale * perp).to(cond.dtype)


@dataclass
class PerpNeg(UncondGuidance):
    negative: str | None = None
    neg_scale: float = 1.0

    branch = "perp_neg"

    @hookimpl
    def configure(self, run) -> None:
        check_prompt("guidance.perp_neg.negative", self.negative)
        super().configure(run)
        check_last(run, self, "perp_neg")
        run.request_branch(self.branch, text=self.negative)

    @hookimpl
    def guidance(self, state, pred):
        if pred.uncond_denoised is None or self.branch not in pred.branches:
            return pred
        return pred.with_denoised(perp_neg(pred.cond_denoised, pred.uncond_denoised, pred.branches[self.branch],
                                           state.run.settings.cfg_scale, self.neg_scale))
