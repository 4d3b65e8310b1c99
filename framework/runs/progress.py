"""The sampling progress bar (tqdm, on a terminal only): a built-in plugin every run has."""
from __future__ import annotations

from tqdm.auto import tqdm

from framework.core.markers import hookimpl
from framework.core.run import Run


class Progress:
    """One step of the bar per sampling step; a batch read back from the run folder counts whole."""

    def bar(self, run: Run) -> tqdm:
        def make() -> tqdm:
            s = run.settings
            batches = -(-len(s.indices()) // s.batch_size)
            return tqdm(total=batches * run.schedule.steps, desc="sampling", unit="step", disable=None, leave=False)

        return run.stash.get(self, make)

    @hookimpl
    def run_start(self, run):
        self.bar(run)

    @hookimpl
    def after_step(self, state, x_next):
        self.bar(state.run).update()

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        if batch.resumed:
            self.bar(run).update(run.schedule.steps)

    def close(self, run: Run) -> None:
        """Close the bar (at the end of the run, or when it stops early)."""
        self.bar(run).close()
