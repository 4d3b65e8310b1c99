"""Plugins and models used by the tests.

Plugins are selected from config with ``+group.name._target_=tests.plugins_for_tests.X``; models are
passed to ``framework.entry.api.run(..., model=...)``. The tracing plugins note every hook call in
``TRACE`` (one list per test process; tests clear it before a run), so a test can check a hook's
stated semantics (docs/hooks.md): how often it runs, in which order, and what it receives.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from framework.plugin import Schedule, hookimpl


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One hook call seen by a tracing plugin."""

    tag: str  # which plugin (its ``tag`` parameter)
    hook: str
    step: int | None = None  # state.index, for the per-step hooks
    sigma: float | None = None  # the evaluation's σ (guidance, momentum), else the step's σ
    first: bool | None = None  # guidance: the step's first evaluation (state.pred is still None)
    seen: Any = None  # what the hook received (a copy), for chain and pass-through checks


TRACE: list[Event] = []


def _note(tag: str, hook: str, state: Any = None, **kw: Any) -> None:
    if state is not None:
        kw.setdefault("step", state.index)
        kw.setdefault("sigma", state.sigma)
    TRACE.append(Event(tag, hook, **kw))


@dataclass
class Tracer:
    """Implements every hook that many plugins may answer (all but schedule, predict, step and
    init_latents) and notes
    each call in ``TRACE``. Its chain hooks pass on something changed, so that the next plugin of
    the chain can be seen to receive it: ``add`` is added to ``denoised`` (guidance, momentum) and
    to every conditioning tensor, with ``+tag`` appended to each prompt; ``drop`` removes the first
    σ values of the schedule; ``shift_x`` is added to ``state.x`` in ``before_step``. With ``only``
    set, the other hooks pass their input on unchanged and unnoted."""

    tag: str = "trace"
    add: float = 0.0
    drop: int = 0
    shift_x: float = 0.0
    only: list[str] = field(default_factory=list)

    def _on(self, hook: str) -> bool:
        return not self.only or hook in self.only

    @hookimpl
    def configure(self, run):
        if self._on("configure"):
            _note(self.tag, "configure")

    @hookimpl
    def run_start(self, run):
        if self._on("run_start"):
            _note(self.tag, "run_start")

    @hookimpl
    def batch_start(self, run, batch):
        if self._on("batch_start"):
            _note(self.tag, "batch_start", seen=list(batch.indices))

    @hookimpl
    def conditioning(self, run, cond):
        if not self._on("conditioning"):
            return cond
        _note(self.tag, "conditioning", seen=(list(cond.prompts), {k: v.clone() for k, v in cond.tensors.items()}))
        return dataclasses.replace(cond, prompts=[f"{p}+{self.tag}" for p in cond.prompts],
                                   tensors={k: v + self.add for k, v in cond.tensors.items()})

    @hookimpl
    def adjust_schedule(self, run, schedule):
        if not self._on("adjust_schedule"):
            return schedule
        _note(self.tag, "adjust_schedule", seen=schedule.sigmas)
        if not self.drop:
            return schedule
        times = None if schedule.timesteps is None else schedule.timesteps[self.drop:]
        return Schedule(schedule.sigmas[self.drop:], times)

    @hookimpl
    def before_step(self, state):
        if not self._on("before_step"):
            return
        _note(self.tag, "before_step", state, seen=state.x.clone())
        if self.shift_x:
            state.x = state.x + self.shift_x

    @hookimpl
    def guidance(self, state, pred):
        if not self._on("guidance"):
            return pred
        _note(self.tag, "guidance", state, sigma=pred.sigma, first=state.pred is None,
              seen=(pred.x.clone(), pred.denoised.clone()))
        return pred.with_denoised(pred.denoised + self.add) if self.add else pred

    @hookimpl
    def momentum(self, state, pred):
        if not self._on("momentum"):
            return pred
        _note(self.tag, "momentum", state, sigma=pred.sigma, seen=(pred.x.clone(), pred.denoised.clone()))
        return pred.with_denoised(pred.denoised + self.add) if self.add else pred

    @hookimpl
    def after_step(self, state, x_next):
        if self._on("after_step"):
            _note(self.tag, "after_step", state, seen=x_next.clone())

    @hookimpl
    def adjust_images(self, run, batch, images):
        if not self._on("adjust_images"):
            return images
        _note(self.tag, "adjust_images", seen=(list(batch.indices), images.clone()))
        return images + self.add

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        if self._on("batch_end"):
            _note(self.tag, "batch_end", seen=(list(batch.indices), latents.clone(), images))

    @hookimpl
    def run_end(self, run, result):
        if self._on("run_end"):
            _note(self.tag, "run_end", seen=result.latents.clone())
            run.metrics[f"{self.tag}_run_end"] = 1.0


@dataclass
class TracedMidpoint:
    """The explicit midpoint method in σ (stages at σ and √(σ·σ_next); Euler on a last step to σ = 0),
    noting each ``step`` call with the direction it received and the x it returns. It asks
    ``denoise`` for the step's first evaluation again, which the hook contract says is free."""

    tag: str = "solver"

    @hookimpl
    def step(self, state, denoise):
        pred = denoise(state.x, state.sigma)  # == state.pred, no new evaluation
        h = state.sigma_next - state.sigma
        if state.sigma_next == 0:
            x_next = pred.x + h * pred.derivative
        else:
            mid = math.sqrt(state.sigma * state.sigma_next)
            x_next = pred.x + h * denoise(pred.x + (mid - state.sigma) * pred.derivative, mid).derivative
        _note(self.tag, "step", state, seen=(state.pred.sigma, state.pred.denoised.clone(), x_next.clone()))
        return x_next


@dataclass
class TracedSchedule:
    """A geometric σ grid from the model's σ_max to its σ_min, then 0, noting each call."""

    tag: str = "schedule"

    @hookimpl
    def schedule(self, model, steps):
        _note(self.tag, "schedule", seen=steps)
        lo, hi = math.log(model.sigma_min), math.log(model.sigma_max)
        body = [math.exp(hi + (lo - hi) * i / max(steps - 1, 1)) for i in range(steps)]
        return Schedule(tuple(body) + (0.0,))


@dataclass
class TracedStart:
    """``init_latents``: notes each call with the unit noise it received; starts from ``value``."""

    tag: str = "start"
    value: float = 3.0

    @hookimpl
    def init_latents(self, run, batch, schedule, noise):
        _note(self.tag, "init_latents", seen=(noise.clone(), schedule.sigmas))
        return torch.full_like(noise, self.value)


@dataclass
class SecondModel:
    """A second ``predict`` answer (to check that exactly one plugin answers it); never called."""

    @hookimpl
    def predict(self, state, x, sigma, cond):
        raise AssertionError("a second model must be rejected at start-up")


# ---------------------------------------------------------------------------------------------
# Models (k-diffusion's denoiser protocol)
# ---------------------------------------------------------------------------------------------
class CountingDenoiser:
    """A denoiser-protocol model that counts its own evaluations (independently of the engine)."""

    def __init__(self, inner: Any):
        self.inner, self.calls = inner, 0
        self.sigma_min, self.sigma_max, self.shape = inner.sigma_min, inner.sigma_max, inner.shape

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return self.inner(x, sigma, **cond)


class ShiftedGaussian:
    """A conditional denoiser-protocol model: the data of a prompt is N(c, 1) with c its length in
    characters (c = 0 for the empty negative prompt), so D(x, σ) = (x + σ²·c)/(1 + σ²). Counts its
    evaluations and keeps every conditioning tensor it was evaluated with."""

    sigma_min, sigma_max, shape = 0.002, 80.0, (4,)
    is_conditional = True

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[torch.Tensor] = []

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"c": torch.tensor([[float(len(p))] for p in prompts], dtype=torch.float64)}

    def __call__(self, x, sigma, c):
        self.calls += 1
        self.seen.append(c.clone())
        s2 = sigma.reshape(-1, 1).to(x.dtype) ** 2
        return (x + s2 * c.to(x.dtype)) / (1 + s2)


# ---------------------------------------------------------------------------------------------
# Plugins that change or break a run
# ---------------------------------------------------------------------------------------------
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
