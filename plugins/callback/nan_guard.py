"""NaN/Inf guard: flags samples whose latents stop being finite.

The check accumulates on the device every step (no host–device sync); the flags are read every
``check_every`` steps and at the end. Policy ``mark``: the sample is recorded as failed and the rest
of the batch is kept; ``stop``: the run stops with an error naming the step, σ and solver.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from framework import hookimpl
from framework.errors import ConfigError, NumericalError


@dataclass
class _FirstBad:
    step: torch.Tensor


@dataclass
class NanGuard:
    policy: str = "mark"
    check_every: int = 10

    def __post_init__(self) -> None:
        if self.policy not in ("mark", "stop"):
            raise ConfigError(f"nan_guard.policy must be mark or stop, got '{self.policy}'")
        if self.check_every < 1:
            raise ConfigError(f"nan_guard.check_every must be ≥ 1, got {self.check_every}")

    @hookimpl
    def after_step(self, state, x_next):
        batch = state.batch
        bad = ~torch.isfinite(x_next).flatten(1).all(1)
        first = state.stash.get(self, lambda: _FirstBad(torch.full_like(bad, -1, dtype=torch.long)))
        first.step = torch.where(bad & (first.step < 0), state.index, first.step)
        batch.failed = bad if batch.failed is None else batch.failed | bad
        if self.policy == "stop" and (state.index % self.check_every == 0 or state.is_last):
            steps = first.step.tolist()
            hit = [(k, s) for k, s in zip(batch.indices, steps) if s >= 0]
            if hit:
                k, s = hit[0]
                sigma = state.schedule.sigmas[s]
                solver = state.run.plugins.by_group("solver")[0].name
                raise NumericalError(
                    f"non-finite latents in sample {k} at step {s} (σ={sigma:.4g}) after solver '{solver}'"
                    f" ({len(hit)} sample(s) affected): lower cfg_scale/guidance scales or use nan_guard.policy=mark"
                )
