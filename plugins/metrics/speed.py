"""Speed and memory of a run: ``sampling_seconds`` (sampling and decoding only — from each batch's
``init_latents`` call, which this plugin observes and answers with None, to its ``batch_end``, so
the work of metrics listed after ``speed`` is left out: list it first; where another plugin's
``init_latents`` answers first, from the previous batch's end), ``sampling_seconds_per_sample``, ``samples_per_second`` (images per second for image
models, also as ``images_per_second``), and the run's peak memory: ``peak_cuda_memory_mb``
(torch.cuda.max_memory_allocated, reset at run start) on a GPU, ``peak_rss_mb`` on the CPU (the
process's resident-set high-water mark VmHWM, reset at run start through /proc/self/clear_refs on
Linux; where that reset is not possible it is the process's lifetime peak, flagged by
``peak_rss_is_lifetime`` = 1). The engine's ``seconds``/``seconds_per_sample`` time every hook."""
from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass

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
class Speed:
    def _sync(self, run) -> None:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)

    @hookimpl
    def run_start(self, run):
        self._seconds, self._samples, self._images, self._t0 = 0.0, 0, False, None
        self._last = time.perf_counter()
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
        else:
            self._rss_reset = _reset_rss_peak()

    @hookimpl
    def init_latents(self, run, batch, schedule, noise):
        """Marks the start of a batch's sampling; returns None so the real initialiser answers."""
        self._sync(run)
        self._t0 = time.perf_counter()
        return None

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        self._sync(run)
        now = time.perf_counter()
        self._seconds += now - (self._t0 if self._t0 is not None else self._last)
        self._t0, self._last = None, now
        self._samples += len(batch.indices)
        self._images = images is not None

    @hookimpl
    def run_end(self, run, result):
        m = run.metrics
        m["sampling_seconds"] = self._seconds
        if self._samples:
            m["sampling_seconds_per_sample"] = self._seconds / self._samples
        if self._seconds > 0:
            m["samples_per_second"] = self._samples / self._seconds
            if self._images:
                m["images_per_second"] = m["samples_per_second"]
        if run.device.type == "cuda":
            m["peak_cuda_memory_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
        else:
            m["peak_rss_mb"] = _rss_peak_mb()
            if not self._rss_reset:
                m["peak_rss_is_lifetime"] = 1.0
