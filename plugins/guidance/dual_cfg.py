"""Dual-condition CFG (ComfyUI's DualCFGGuider / Guider_DualCFG): two positive prompts with scales
of their own. With D_1 the run's prompt (ComfyUI's cond1), D_2 a second prompt ``prompt2`` (cond2,
"middle": a prompt branch of every evaluation), D_n the negative prompt, s = ``cfg_scale``
(ComfyUI's cfg_cond2_negative) and s₁ = ``scale`` (cfg_conds):

- ``style=regular``:  D = D_n + s·(D_2 − D_n) + s₁·(D_1 − D_2)
- ``style=nested``:   D = D_n + s·(D_2 + s₁·(D_1 − D_2) − D_n)

(ComfyUI: regular = cfg_function(cond=D_2, uncond=D_n, cfg2) + (D_1 − D_2)·cfg1; nested =
D_n + cfg2·(cfg_function(cond=D_1, uncond=D_2, cfg1) − D_n)). Linear in the predictions, so the
same in D as in ε or v. Write it instead of ``cfg``: ``guidance=[dual_cfg]``, 3 network inputs per
sample (1.5 NFE in the CFG-pair convention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.plugin import Choice, UncondGuidance, hookimpl
from plugins.guidance.prompt_branch import check_last, check_prompt


class Style(Choice):
    regular = "regular"
    nested = "nested"


def dual_cfg(d1: torch.Tensor, d2: torch.Tensor, dn: torch.Tensor, scale: float, scale1: float, style: str) -> torch.Tensor:
    """The combination of the module docstring."""
    if style == Style.nested:
        return dn + scale * (d2 + scale1 * (d1 - d2) - dn)
    return dn + scale * (d2 - dn) + scale1 * (d1 - d2)


@dataclass
class DualCFG(UncondGuidance):
    prompt2: str | None = None
    scale: float = 8.0
    style: Style = Style.regular

    branch = "dual_cfg"

    @hookimpl
    def configure(self, run) -> None:
        check_prompt("guidance.dual_cfg.prompt2", self.prompt2)
        super().configure(run)
        check_last(run, self, "dual_cfg")
        run.request_branch(self.branch, text=self.prompt2)

    @hookimpl
    def guidance(self, state, pred):
        if pred.uncond_denoised is None or self.branch not in pred.branches:
            return pred
        return pred.with_denoised(dual_cfg(pred.cond_denoised, pred.branches[self.branch], pred.uncond_denoised,
                                           state.run.settings.cfg_scale, self.scale, self.style))
