"""What momentum/history plugins share: the solver compatibility check and the past derivatives.

A momentum plugin transforms the direction a single-evaluation solver steps along (the denoised
estimate D, or the derivative d = (x − D)/σ). Such a solver declares it on its class:

    steps_along_denoised: ClassVar[bool] = True

meaning its step uses the step's one evaluation only through D in x' = x + (σ_down − σ)·(x − D)/σ
(plus fresh noise of std σ_up: DDIM's η), so a changed D changes the direction and nothing else
(euler, ddim). Any other solver — multi-stage, multistep with its own history, trajectory-free — is a
configuration error raised at start-up, whatever its config is named.
"""
from __future__ import annotations

import torch

from framework.core.errors import ConfigError
from framework.core.markers import hookimpl
from framework.core.state import StepRecord


class MomentumPlugin:
    """Base of the momentum family: checks that the configured solver declares ``steps_along_denoised``."""

    @hookimpl
    def configure(self, run) -> None:
        solver = run.plugins.by_group("solver")[0]
        if not getattr(solver.obj, "steps_along_denoised", False):
            me = run.plugins.name_of(self)
            raise ConfigError(
                f"momentum {me} does not compose with solver={solver.name}: it changes the direction of a "
                "single-evaluation solver that steps along D (solver=euler or solver=ddim)"
            )


def past_derivative(record: StepRecord) -> torch.Tensor:
    """The raw derivative (x − D)/σ of a finished step's first evaluation (before momentum)."""
    return (record.x - record.denoised) / record.sigma
