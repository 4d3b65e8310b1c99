"""Stray marks and edge sharpness of pictures of the bundled world (issue 29; the measure is
``framework.bundled.marks``): the share of pixels whose colour is farther than ``far`` from every
colour the prompt names and from the picture's background (its border colour) — and, in a picture
the bundled judge calls striped, from those colours' stripe bands — outside a ``band``-pixel band
around edges between those colours; and the 10–90 % rise width of the edges.

Reports ``stray_marks_share`` (mean over samples of the per-image share), ``stray_marks_images``
(share of samples with any stray pixel), ``stray_marks_max`` (worst image), ``stray_marks_edge_width``
(ramp pixels per boundary step; real scenes ≈ 0.4) and ``stray_marks_n``. Pictures are measured
as they are made (batch_end). Meant for prompts of the world's grammar (colour words name the
shapes; an unnamed background is read off the border)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from framework.plugin import ConfigError, bundled, hookimpl, marks


@dataclass
class _Tally:
    """A run's judge (its striped head says which pictures may show stripe bands), per-image shares
    and edge counts (in the run's stash)."""

    judge: Any
    shares: list[float] = field(default_factory=list)
    ramp: float = 0.0
    steps: float = 0.0


@dataclass
class StrayMarks:
    far: float = marks.FAR
    band: int = marks.BAND

    def tally(self, run) -> _Tally:
        return run.stash.get(self, lambda: _Tally(bundled.load_judge()))

    @hookimpl
    def configure(self, run):
        if not run.model.has_decoder:
            raise ConfigError("stray_marks measures images but this model has no decoder: use model=bundled")
        if not 0 < self.far < 1.8:
            raise ConfigError(f"metrics.stray_marks.far={self.far}: give an RGB distance in (0, 1.8), e.g. 0.2")
        if int(self.band) != self.band or self.band < 0:
            raise ConfigError(f"metrics.stray_marks.band={self.band}: give a whole number of pixels ≥ 0, e.g. 2")
        self.tally(run)

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        prompts = list(batch.cond.prompts) if batch.cond is not None else []
        prompts += [""] * (len(images) - len(prompts))
        images = images.detach().float().cpu()
        tally = self.tally(run)
        with torch.no_grad():
            striped = tally.judge.predict(images * 2 - 1)["striped"]
        m = marks.measure_prompts(images, prompts, striped=striped, far=self.far, band=int(self.band))
        tally.shares += [float(s) for s in m["stray_share"]]
        tally.ramp += m["ramp_pixels"]
        tally.steps += m["boundary_steps"]

    @hookimpl
    def run_end(self, run, result):
        tally = self.tally(run)
        n = len(tally.shares)
        run.metrics["stray_marks_n"] = float(n)
        if n:
            run.metrics["stray_marks_share"] = sum(tally.shares) / n
            run.metrics["stray_marks_images"] = sum(s > 0 for s in tally.shares) / n
            run.metrics["stray_marks_max"] = max(tally.shares)
        if tally.steps:
            run.metrics["stray_marks_edge_width"] = tally.ramp / tally.steps
