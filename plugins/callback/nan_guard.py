"""NaN/Inf guard: finds the samples whose values stop being finite, and the step, σ and plugin where
they first did.

With this plugin on, the engine checks the output of every hook of the loop (model, each guidance,
momentum and before-step plugin, the solver) on the device — a few kernels per check and no
host–device synchronisation (``framework.core.engine.NonFinite``). The flags are read every
``check_every`` steps and at the end of each batch, the only synchronisations. Policy ``mark``: the
failed samples are recorded (``record.json``: ``failed_samples``, ``failures``), get no PNG, and the
rest of the batch is kept; ``stop``: the run stops with an error naming the sample, step, σ and
plugin, at most ``check_every`` steps after the fault.
"""
from __future__ import annotations

from dataclasses import dataclass

from framework.plugin import Choice, ConfigError, NonFinite, NumericalError, describe, hookimpl


class Policy(Choice):
    mark = "mark"
    stop = "stop"


@dataclass
class NanGuard:
    policy: Policy = Policy.mark
    check_every: int = 10

    def __post_init__(self) -> None:
        if self.check_every < 1:
            raise ConfigError(f"callback.nan_guard.check_every must be ≥ 1, got {self.check_every}")

    @hookimpl
    def configure(self, run):
        run.request_finite_checks()

    @hookimpl
    def after_step(self, state, x_next):
        if self.policy != "stop" or ((state.index + 1) % self.check_every and not state.is_last):
            return
        watch = NonFinite.of(state.batch)
        hits = [(point, k) for k, point in zip(state.batch.indices, watch.read()) if point is not None]
        if hits:
            point, k = min(hits, key=lambda h: h[0][0])
            raise NumericalError(
                f"non-finite values in sample {k} {describe(point)} ({len(hits)} sample(s) affected): "
                "lower cfg_scale/guidance scales, or use callback.nan_guard.policy=mark to keep the other samples"
            )
