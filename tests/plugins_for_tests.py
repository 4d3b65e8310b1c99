"""Plugins used by the tests (selected from config with +group.name._target_=tests.plugins_for_tests.X)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from framework.core.markers import hookimpl


@dataclass
class Recorder:
    """Records every hook call it sees, in a class-level log the tests read."""

    tag: str = "rec"
    log: ClassVar[list[tuple[str, str]]] = []

    def _note(self, hook: str) -> None:
        Recorder.log.append((self.tag, hook))

    @hookimpl
    def configure(self, run):
        self._note("configure")

    @hookimpl
    def run_start(self, run):
        self._note("run_start")

    @hookimpl
    def conditioning(self, run, cond):
        self._note("conditioning")
        return cond

    @hookimpl
    def before_step(self, state):
        self._note("before_step")

    @hookimpl
    def guidance(self, state, pred):
        self._note("guidance")
        return pred

    @hookimpl
    def after_step(self, state, x_next):
        self._note("after_step")

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        self._note("batch_end")

    @hookimpl
    def run_end(self, run, result):
        self._note("run_end")
        run.metrics[f"{self.tag}_seen"] = 1.0


@dataclass
class AddToDenoised:
    """Guidance that adds a constant to D (to test config order: the order changes the result)."""

    value: float = 0.0
    factor: float = 1.0

    @hookimpl
    def guidance(self, state, pred):
        return pred.with_denoised(pred.denoised * self.factor + self.value)


@dataclass
class Exploding:
    """A solver that returns NaN for sample 1 from step ``at`` on."""

    at: int = 1

    @hookimpl
    def step(self, state, denoise):
        x = state.pred.x + (state.sigma_next - state.sigma) * state.pred.derivative
        if state.index >= self.at and x.shape[0] > 1:
            x = x.clone()
            x[1] = float("nan")
        return x


@dataclass
class Raising:
    @hookimpl
    def before_step(self, state):
        raise RuntimeError("boom")
