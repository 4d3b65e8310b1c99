"""What the prompt-branch guidance plugins share (perp_neg, dual_cfg, regional, timed_prompt;
docs/guidance.md, "Prompts as branches"): the check of a configured prompt, the place of a plugin
in the guidance chain, and the replacement of the conditional prediction before the CFG combiner.

A prompt branch is an extra evaluation of every step on a prompt of the plugin's own
(``run.request_branch(name, text=prompt)``): encoded once per batch by the model, stacked with the
CFG pair in one network call, its denoised is ``pred.branches[name]``."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from framework.plugin import ConfigError, PerturbationGuidance, UncondGuidance


def check_prompt(key: str, value: Any) -> str:
    """The prompt of config key ``key``: a string (the empty prompt is one), else one line."""
    if value is None or not isinstance(value, str):
        raise ConfigError(f"{key} is missing: give the prompt as a string, e.g. {key}='a red circle'")
    return value


def check_first(run: Any, plugin: object, name: str) -> None:
    """Refuse a plugin that edits the conditional prediction when a CFG combiner or a perturbation
    guidance plugin comes before it (they would have used the unedited one)."""
    guidance = run.plugins.by_group("guidance")
    mine = next(k for k, e in enumerate(guidance) if e.obj is plugin)
    earlier = [e.name for e in guidance[:mine] if isinstance(e.obj, (UncondGuidance, PerturbationGuidance))]
    if earlier:
        raise ConfigError(f"guidance {name} edits the conditional prediction, but {earlier[0]} comes before it and "
                          f"would use the unedited one: write guidance=[{name},{earlier[0]}]")


def check_last(run: Any, plugin: object, name: str) -> None:
    """Refuse a CFG combiner after this one (it would overwrite its combination)."""
    guidance = run.plugins.by_group("guidance")
    mine = next(k for k, e in enumerate(guidance) if e.obj is plugin)
    later = [e.name for e in guidance[mine + 1:] if isinstance(e.obj, UncondGuidance)]
    if later:
        raise ConfigError(f"guidance {later[0]} comes after {name} and would overwrite its combination: "
                          f"{name} is a CFG combiner itself, remove {later[0]}")


def with_cond(pred: Any, cond: torch.Tensor) -> Any:
    """The prediction with its conditional part replaced (and D, which is still D_c before CFG)."""
    if pred.cond_denoised is not None:
        return replace(pred, cond_denoised=cond, denoised=cond)
    return pred.with_denoised(cond)
