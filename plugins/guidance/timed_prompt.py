"""Timed prompts (prompt editing / scheduling, as A1111's ``[from:to:when]`` and ComfyUI's
ConditioningSetTimestepRange): the conditional prediction takes another ``prompt`` inside a σ
range or a range of the steps — the coarse layout from one prompt, the details from another.
Inside the range the prompt is a prompt branch of every evaluation (D_p) and

    D_c ← D_p

before the CFG combiner (so CFG gives D_u + s·(D_p − D_u)); outside it no branch is evaluated and
nothing changes. The range: σ ∈ (sigma_lo, sigma_hi] when either is given, and the steps
⌊start·N⌋ ≤ i < ⌊stop·N⌋ of the N steps (both must hold). Write it before the CFG combiner:
``guidance=[timed_prompt,cfg]``; inside the range the prompt's input replaces nothing in the call:
one more network input per sample (the run's prompt is still evaluated: other plugins may use it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from framework.plugin import ConfigError, check_window, hookimpl, step_window
from plugins.guidance.prompt_branch import check_first, check_prompt, with_cond


@dataclass
class TimedPrompt:
    prompt: str | None = None
    sigma_lo: float | None = None
    sigma_hi: float | None = None
    start: float = 0.0
    stop: float = 1.0

    branch = "timed_prompt"

    def __post_init__(self) -> None:
        check_window("timed_prompt", self.start, self.stop)
        lo, hi = self.sigma_lo, self.sigma_hi
        if (lo is not None and lo < 0) or (lo is not None and hi is not None and lo >= hi):
            raise ConfigError(f"guidance.timed_prompt needs 0 ≤ sigma_lo < sigma_hi, got sigma_lo={lo}, sigma_hi={hi}")

    def active(self, state: Any, sigma: float) -> bool:
        if self.sigma_lo is not None and not sigma > self.sigma_lo:
            return False
        if self.sigma_hi is not None and not sigma <= self.sigma_hi:
            return False
        return step_window(self.start, self.stop, state.index, state.schedule.steps)

    @hookimpl
    def configure(self, run) -> None:
        check_prompt("guidance.timed_prompt.prompt", self.prompt)
        check_first(run, self, "timed_prompt")
        run.request_branch(self.branch, text=self.prompt, when=self.active)

    @hookimpl
    def guidance(self, state, pred):
        timed = pred.branches.get(self.branch)
        return pred if timed is None else with_cond(pred, timed)
