"""What momentum/history plugins share: the solver compatibility check and the past derivatives.

A momentum plugin transforms the direction a single-evaluation solver steps along (the denoised
estimate D, or the derivative d = (x − D)/σ). It states the solvers it composes with in
``solvers``; any other solver is a configuration error raised at start-up.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from framework.core.markers import hookimpl
from framework.core.errors import ConfigError
from framework.core.state import StepRecord

#: Single-evaluation solvers that step along D: x' = x + (σ' − σ)·(x − D)/σ (plus noise for ddim η > 0).
DIRECTION_SOLVERS = ("euler", "ddim")


class MomentumPlugin:
    """Base of the momentum family: checks the configured solver against ``solvers``."""

    solvers: ClassVar[tuple[str, ...]] = DIRECTION_SOLVERS

    @hookimpl
    def configure(self, run) -> None:
        solver = run.plugins.by_group("solver")[0].name
        if solver not in self.solvers:
            me = run.plugins.name_of(self)
            raise ConfigError(f"momentum {me} does not compose with solver={solver}: use one of {', '.join(self.solvers)}")


def past_derivative(record: StepRecord) -> torch.Tensor:
    """The raw derivative (x − D)/σ of a finished step's first evaluation (before momentum)."""
    return (record.x - record.denoised) / record.sigma
