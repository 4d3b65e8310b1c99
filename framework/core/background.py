"""Host work of a run that overlaps sampling: one worker thread per run, jobs in submission order.

A batch's host work — its PNGs and batch file, the metrics' feature extraction and updates — does
not decide anything the next batch needs, so it runs on :class:`Background`'s thread while the main
thread samples the next batch (issue 26: evaluation throughput). What stays the same:

- **order**: one thread, first in first out; a batch's latents file (its "done" mark) is still
  written after its PNGs, and metric states see the batches in the same order as inline;
- **results**: the worker runs with the creator's torch thread count and without gradients, so
  its arithmetic is the arithmetic of the main thread (PNGs, features and scores bit-identical);
- **errors**: a job that raises stops the jobs after it (a batch file is never written after its
  PNGs failed); the error is raised again in the main thread at the next ``submit`` or ``drain``;
- **memory**: at most ``depth`` jobs wait; ``submit`` blocks beyond that (back-pressure).

``host_copy`` starts a device→host copy without waiting for it (pinned memory, CUDA only); the job
that reads the copy waits for it (:meth:`HostCopy.get`), so the main thread never synchronises.
Runs find their worker with :func:`background` (``run.stash``); the run loop drains it before
``run_end`` and before the record.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

_STOP = object()


class Background:
    """One worker thread running submitted jobs in order (started at the first job)."""

    def __init__(self, depth: int = 16):
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._threads = torch.get_num_threads()
        self.jobs_run = 0
        self.busy_s = 0.0  # seconds the worker spent in jobs (host work taken off the main thread)
        self.waited_s = 0.0  # seconds the main thread waited for the worker (queue full, drain)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on the worker after every job submitted before it."""
        self._raise()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="samplerlab-background", daemon=True)
            self._thread.start()
        t0 = time.perf_counter()
        self._jobs.put((fn, args, kwargs))
        self.waited_s += time.perf_counter() - t0

    def drain(self) -> None:
        """Wait until every submitted job ran; raise the first job error here."""
        if self._thread is not None:
            t0 = time.perf_counter()
            self._jobs.join()
            self.waited_s += time.perf_counter() - t0
        self._raise()

    def close(self) -> None:
        """Finish the jobs, stop the thread (errors are dropped: call :meth:`drain` to see them)."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        torch.set_num_threads(self._threads)  # the creator's: same reductions, same bits
        while True:
            job = self._jobs.get()
            try:
                if job is _STOP:
                    return
                if self._error is None:  # after an error the rest is skipped (its order may matter)
                    fn, args, kwargs = job
                    t0 = time.perf_counter()
                    try:
                        with torch.no_grad():
                            fn(*args, **kwargs)
                        self.jobs_run += 1
                    except BaseException as e:  # noqa: BLE001 - handed to the main thread
                        self._error = e
                    self.busy_s += time.perf_counter() - t0
            finally:
                self._jobs.task_done()


def background(run: Any) -> Background:
    """The run's worker (one per run, in ``run.stash``)."""
    return run.stash.get(Background, Background)


def drain(run: Any) -> None:
    """Wait for the run's background jobs; raise the first job error."""
    background(run).drain()


def close(run: Any) -> None:
    """Finish the run's background jobs and stop its thread (a later job starts a new one)."""
    background(run).close()


class HostCopy:
    """A tensor's copy in host memory, started without waiting (pinned + ``non_blocking`` on CUDA;
    the tensor itself on the CPU). :meth:`get` waits for the copy (call it on the worker)."""

    def __init__(self, t: torch.Tensor):
        t = t.detach()
        self._event = None
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(t.device))
        else:
            self._host = t.cpu()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


def host_copy(t: torch.Tensor | None) -> HostCopy | None:
    return None if t is None else HostCopy(t)
