"""NaN/Inf checking on the device: where each sample first stopped being finite.

A NaN guard (``callback=[nan_guard]``) calls ``run.request_finite_checks()``; the engine then checks
the output of every hook with :meth:`NonFinite.check` (device kernels, no synchronisation) and reads
the result once per batch, or every k steps when the guard asks.
"""
from __future__ import annotations

import torch

from framework.core.state import Batch

#: How a hook's plugin is named in messages.
ROLE = {"predict": "model", "guidance": "guidance", "momentum": "momentum", "step": "solver",
        "before_step": "before_step plugin"}


class NonFinite:
    """Where each sample of a batch first stopped being finite, accumulated on the device.

    ``check`` notes the check point (step, σ, hook, plugin) in a host list and keeps, per sample, the
    number of the first point where the checked tensor held a NaN/Inf. ``read`` is the only
    host–device synchronisation.
    """

    def __init__(self, size: int, device: torch.device):
        self.first = torch.full((size,), -1, dtype=torch.long, device=device)
        self.points: list[tuple[int, float, str, str]] = []
        self.reads = 0

    @staticmethod
    def of(batch: Batch) -> NonFinite | None:
        """The batch's watch, when a plugin asked for finite checks (``run.request_finite_checks``)."""
        return batch.stash.get(NonFinite, lambda: None)

    def check(self, t: torch.Tensor, index: int, sigma: float, hook: str, plugin: str) -> None:
        self.points.append((index, sigma, hook, plugin))
        bad = ~torch.isfinite(t.detach()).flatten(1).all(1)
        self.first = torch.where(bad & (self.first < 0), len(self.points) - 1, self.first)

    def read(self) -> list[tuple[int, float, str, str] | None]:
        """Per sample: (step, σ, hook, plugin) of its first non-finite value, or None (one sync)."""
        self.reads += 1
        return [None if c < 0 else self.points[c] for c in self.first.tolist()]


def describe(point: tuple[int, float, str, str]) -> str:
    """'at step 2 (σ=3.1) after solver 'euler'' for a check point."""
    step, sigma, hook, plugin = point
    return f"at step {step} (σ={sigma:.4g}) after {ROLE.get(hook, hook)} '{plugin}'"


def failures(batch: Batch) -> dict[int, str]:
    """Global index → why the sample failed, read once at the end of the batch (one sync)."""
    out: dict[int, str] = {}
    watch = NonFinite.of(batch)
    if watch is not None:
        for k, point in zip(batch.indices, watch.read()):
            if point is not None:
                out[k] = f"non-finite values {describe(point)}"
        flags = watch.first >= 0
        batch.failed = flags if batch.failed is None else batch.failed | flags
    if batch.failed is not None:  # plugins may mark samples failed themselves
        for k, bad in zip(batch.indices, batch.failed.tolist()):
            if bad:
                out.setdefault(k, "marked failed by a plugin")
    return dict(sorted(out.items()))
