"""Sampling progress, a built-in plugin every run has.

On a terminal: a tqdm bar, one tick per sampling step, left on screen when the run ends. Anywhere
else (nohup, CI, a SLURM log), where a bar would be noise: a line at most every
:data:`INTERVAL` seconds — ``samplerlab: sampling: batch 3 of 10 (step 7 of 20), 2.4 images/s,
ETA 0:01:12``. The same lines go to the ``samplerlab`` logger (under the CLI: the run folder's
``samplerlab.log``), whatever the terminal.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

from tqdm.auto import tqdm

from framework.core.markers import hookimpl
from framework.core.run import Run

LOG = logging.getLogger("samplerlab")
#: Seconds between two progress lines (off a terminal, and in the log).
INTERVAL = 10.0


@dataclass
class Throttle:
    """Progress lines at most one every :data:`INTERVAL` seconds, to the ``samplerlab`` logger and
    stderr: the sampling progress below, and work with no steps to count (an adaptive solver's one long step)."""

    last: float = field(default_factory=time.monotonic)

    def maybe(self, text, echo: bool = True) -> None:
        """Report ``text()`` (called only when a line is due); ``echo=False``: to the logger only."""
        now = time.monotonic()
        if now - self.last >= INTERVAL:
            self.last = now
            line = text()
            LOG.info(line)
            if echo:
                print(f"samplerlab: {line}", file=sys.stderr, flush=True)


@dataclass
class _Count:
    """One run's progress: what is done, of how much, since when."""

    batches: int
    steps_per_batch: int
    bar: tqdm | None
    batch: int = 0  # batches finished
    samples: int = 0  # samples finished
    step: int = 0  # steps done in the current batch
    start: float = field(default_factory=time.monotonic)
    clock: Throttle = field(default_factory=Throttle)  # when the last line was written

    def line(self) -> str:
        done = (self.batch * self.steps_per_batch + self.step) / max(1, self.batches * self.steps_per_batch)
        elapsed = time.monotonic() - self.start
        where = f"batch {self.batch + 1} of {self.batches}" if self.batch < self.batches else \
            f"{self.batches} of {self.batches} batches done"
        if self.step:
            where += f" (step {self.step} of {self.steps_per_batch})"
        rate = f", {self.samples / elapsed:.3g} images/s" if self.samples and elapsed > 0 else ""
        eta = f", ETA {timedelta(seconds=round(elapsed * (1 - done) / done))}" if done > 0 else ""
        return f"sampling: {where}{rate}{eta}"


class Progress:
    """A bar on a terminal, throttled lines elsewhere; a batch read back from the run folder counts whole."""

    def count(self, run: Run) -> _Count:
        def make() -> _Count:
            s = run.settings
            batches = -(-len(s.indices()) // s.batch_size)
            steps = run.schedule.steps
            on_terminal = sys.stderr.isatty()
            bar = tqdm(total=batches * steps, desc="sampling", unit="step", leave=True) if on_terminal else None
            return _Count(batches, steps, bar)

        return run.stash.get(self, make)

    def _maybe_report(self, count: _Count) -> None:
        count.clock.maybe(count.line, echo=count.bar is None)

    @hookimpl
    def run_start(self, run):
        self.count(run)

    @hookimpl
    def after_step(self, state, x_next):
        count = self.count(state.run)
        count.step += 1
        if count.bar is not None:
            count.bar.update()
        self._maybe_report(count)

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        count = self.count(run)
        if count.bar is not None and batch.resumed:
            count.bar.update(run.schedule.steps)
        count.batch, count.step = count.batch + 1, 0
        count.samples += len(batch.indices)
        self._maybe_report(count)

    def close(self, run: Run) -> None:
        """Close the bar (at the end of the run, or when it stops early)."""
        count = self.count(run)
        if count.bar is not None:
            count.bar.close()
