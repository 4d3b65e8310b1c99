"""Speed and memory of a run: ``sampling_seconds`` (sampling and decoding only — from each batch's
``batch_start`` to its ``batch_end``, so the work of metrics listed after ``speed`` is left out:
list it first), ``sampling_seconds_per_sample``, ``samples_per_second`` (images per second for
image models, also as ``images_per_second``), and the run's peak memory: ``peak_cuda_memory_mb``
(torch.cuda.max_memory_allocated, reset at run start) on a GPU, ``peak_rss_mb`` on the CPU (the
process's resident-set high-water mark VmHWM, reset at run start through /proc/self/clear_refs on
Linux; where that reset is not possible it is the process's lifetime peak, flagged by
``peak_rss_is_lifetime`` = 1). The engine's ``seconds``/``seconds_per_sample`` time every hook."""
from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from framework.plugin import hookimpl


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class _Clock:
    """A run's sampling time so far (in the run's stash)."""

    seconds: float = 0.0
    samples: int = 0
    images: bool = False
    t0: float | None = None  # the current batch's start (batch_start)
    last: float = field(default_factory=time.perf_counter)  # the previous batch's end (read-back batches have no start)
    rss_reset: bool = False


@dataclass
class Speed:
    def _sync(self, run) -> None:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)

    def clock(self, run) -> _Clock:
        return run.stash.get(self, _Clock)

    @hookimpl
    def run_start(self, run):
        clock = self.clock(run)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
        else:
            clock.rss_reset = _reset_rss_peak()
        clock.last = time.perf_counter()

    @hookimpl
    def batch_start(self, run, batch):
        self._sync(run)
        self.clock(run).t0 = time.perf_counter()

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        self._sync(run)
        clock, now = self.clock(run), time.perf_counter()
        clock.seconds += now - (clock.t0 if clock.t0 is not None else clock.last)
        clock.t0, clock.last = None, now
        clock.samples += len(batch.indices)
        clock.images = images is not None

    @hookimpl
    def run_end(self, run, result):
        m, clock = run.metrics, self.clock(run)
        m["sampling_seconds"] = clock.seconds
        if clock.samples:
            m["sampling_seconds_per_sample"] = clock.seconds / clock.samples
        if clock.seconds > 0:
            m["samples_per_second"] = clock.samples / clock.seconds
            if clock.images:
                m["images_per_second"] = m["samples_per_second"]
        if run.device.type == "cuda":
            m["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
        else:
            m["peak_rss_mb"] = _rss_peak_mb()
            if not clock.rss_reset:
                m["peak_rss_is_lifetime"] = 1.0
