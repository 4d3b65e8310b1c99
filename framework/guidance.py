"""What classifier-free-guidance combiners share: asking the model adapter for the unconditional pass."""
from __future__ import annotations

from framework import hookimpl


class UncondGuidance:
    """Base of guidance plugins that combine the conditional and unconditional predictions: on a
    text-conditioned model it requests the batched negative-prompt pass in ``configure``; the
    plugin's ``guidance`` hook leaves predictions without one (unconditional models) unchanged."""

    @hookimpl
    def configure(self, run) -> None:
        if run.model.is_conditional:
            run.request_uncond()
