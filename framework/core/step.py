"""The step as plugins see it: :class:`SamplerState`, and the engine's evaluation ``denoise(x, σ)``
(:class:`Denoiser`), the one place where the model is called, NFE counted and outputs checked."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from framework.core.errors import PluginError, call
from framework.core.finite import NonFinite
from framework.core.run import Run
from framework.core.state import Batch, Prediction, Schedule, Stash, StepRecord


@dataclass
class SamplerState:
    """What the per-step hooks see. ``pred`` is the step's first evaluation, made by the engine
    before ``step`` is called (guidance and momentum already applied); ``denoise`` is the engine's
    evaluation (what the solver receives), for plugins that evaluate the model themselves."""

    run: Run
    batch: Batch
    index: int
    x: torch.Tensor
    sigma: float  # the grid's σ_i, unless a before_step plugin (churn) raised it
    schedule: Schedule
    denoise: Denoiser
    pred: Prediction | None = None  # the step's first evaluation, after guidance and momentum
    guided: Prediction | None = None  # the same evaluation before momentum (the model's, guided)

    @property
    def sigma_next(self) -> float:
        return self.schedule.sigmas[self.index + 1]

    @property
    def to_zero(self) -> bool:
        """Whether this step ends at σ = 0: a host fact, also inside a captured step (compile=step),
        where ``sigma_next`` is a tensor."""
        return self.sigma_next == 0

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.schedule.steps - 1

    @property
    def denoised(self) -> torch.Tensor:
        assert self.pred is not None
        return self.pred.denoised

    @property
    def history(self) -> list[StepRecord]:
        """The batch's finished steps, oldest first, that multistep solvers and momentum plugins
        may use: all of them, except a first step taken from σ = ∞ (an evaluation at ∞ is no node of
        a polynomial in σ, λ or t; dropping it is the exact limit of those rules, so the step after
        it starts their warm-up)."""
        past = self.batch.history
        return past[1:] if past and math.isinf(past[0].sigma) else past

    @property
    def stash(self) -> Stash:
        return self.batch.stash

    def noise(self, sigma_a: float | None = None, sigma_b: float | None = None) -> torch.Tensor:
        """Unit Gaussian noise shaped like x, from each sample's own generator. SDE solvers pass
        the σ interval the noise stands for, so that ``noise=brownian`` gives Brownian increments."""
        assert self.batch.noise is not None
        if sigma_a is None or sigma_b is None:
            return self.batch.noise.draw()
        return self.batch.noise.between(sigma_a, sigma_b)


class Denoiser:
    """``denoise(x, σ)``: the model adapter's ``predict``, then the ``guidance`` chain in config
    order; one NFE per evaluation, every output checked for NaN/Inf when a plugin asked for it.

    Called at the step's own point ``(state.x, state.sigma)`` it returns the step's first evaluation
    (``state.pred``) without evaluating again."""

    def __init__(self, run: Run, batch: Batch):
        assert run.hooks is not None
        self.run, self.batch = run, batch
        self.state: SamplerState | None = None
        self._predict_name, self._predict = run.hooks.predict
        self.watch = NonFinite.of(batch)

    def __call__(self, x: torch.Tensor, sigma: float) -> Prediction:
        st = self.state
        assert st is not None
        if st.pred is not None and x is st.x and sigma == st.sigma:
            return st.pred
        return self.evaluate(x, sigma)

    def evaluate(self, x: torch.Tensor, sigma: float, guidance: Callable[[object], bool] | None = None) -> Prediction:
        """A new evaluation at ``(x, σ)``. ``guidance`` chooses the guidance plugins that apply (a
        test on the plugin object; default: all), for plugins that evaluate inside their own hook."""
        st = self.state
        assert st is not None and self.run.hooks is not None
        pred = call(self._predict_name, "predict", self._predict, state=st, x=x, sigma=sigma, cond=self.batch.cond)
        if pred.denoised.shape != x.shape:  # blame the model here, not the solver that would trip on it
            raise PluginError(self._predict_name, "predict", ValueError(
                f"the model returned a denoised of shape {list(pred.denoised.shape)} for x of shape {list(x.shape)}: "
                "it must return one prediction shaped like its input"))
        self.batch.nfe += 1
        watch = self.watch
        if watch is not None:
            watch.check(pred.denoised, st.index, sigma, "predict", self._predict_name)
        for name, fn, grad in self.run.hooks.guidance:
            if guidance is not None and not guidance(fn.__self__):
                continue
            with torch.enable_grad() if grad else contextlib.nullcontext():
                pred = call(name, "guidance", fn, state=st, pred=pred)
            if watch is not None:
                watch.check(pred.denoised, st.index, sigma, "guidance", name)
        return pred
