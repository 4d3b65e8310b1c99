"""Per-step previews of the sampling loop (the deep dive's "predicted x₀ at every step").

After every ``every``-th step (and always the last) the plugin keeps, for the first ``samples``
samples of the run, the step's predicted x₀ — the denoiser's first evaluation D(x_i, σ_i) after
guidance — and the step's input x_i. Both are decoded after each batch (in ``batch_end``, VAE
calls only, no denoiser evaluation: the plugin adds no NFE). x_i is decoded as a pipeline would decode
latents at σ_i (``model.output_latents``: x/√(1+σ²) for Stable Diffusion).

At ``run_end``, when the run has an output folder, it writes ``preview.png`` (rows = samples,
columns = recorded steps, predicted x₀), ``preview_xt.png`` (the same for x_i) and
``preview.json`` (each column's step index, σ_i, σ_{i+1} and the NFE counted up to the end of the
step, plus the grid layout, so the tiles can be read back with :func:`read_tiles`). With a solver
whose last step lands on σ = 0 at the prediction (Euler, DDIM), the last column of
``preview.png`` is the run's final image. Batches read back from a run folder (``resume``) were not
sampled, so they have no preview; a run returned whole from its folder keeps its earlier previews.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framework.plugin import ConfigError, atomic_write_bytes, atomic_write_json, grid, hookimpl, png_bytes

PAD = 2


@dataclass
class _Recorded:
    """What a run recorded (in the run's stash): the columns and each kept sample's tiles."""

    columns: list[dict] = field(default_factory=list)
    x0: dict[int, torch.Tensor] = field(default_factory=dict)  # sample index → [columns, 3, H, W]
    xt: dict[int, torch.Tensor] = field(default_factory=dict)

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x₀, x_t), each [samples, columns, 3, H, W] in [0, 1], in sample order."""
        order = sorted(self.x0)
        return torch.stack([self.x0[k] for k in order]), torch.stack([self.xt[k] for k in order])


@dataclass
class Preview:
    every: int = 1
    samples: int = 4

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"callback.preview.every must be ≥ 1, got {self.every}")
        if self.samples < 1:
            raise ConfigError(f"callback.preview.samples must be ≥ 1, got {self.samples}")

    @hookimpl
    def configure(self, run):
        if not run.model.has_decoder:
            raise ConfigError("callback.preview decodes latents but this model has no decoder: use an image model (e.g. model=bundled)")

    def _rows(self, batch) -> list[int]:
        return [j for j, k in enumerate(batch.indices) if k < self.samples]

    @hookimpl
    def after_step(self, state, x_next):
        if state.index % self.every and not state.is_last:
            return
        rows = self._rows(state.batch)
        if not rows:
            return
        kept = state.stash.get(self, list)
        sigma = state.sigma
        xt = state.run.model.output_latents(state.x[rows], sigma)
        kept.append((state.index, sigma, state.sigma_next, state.batch.nfe, state.guided.denoised[rows].detach(), xt.detach()))

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        kept = batch.stash.get(self, list)
        if not kept:
            return
        with torch.no_grad():  # one decode per recorded step (a 512² VAE batch of every step would not fit)
            x0 = torch.stack([run.model.decode(k[4]).float().cpu() for k in kept], dim=1)  # [rows, steps, 3, H, W]
            xt = torch.stack([run.model.decode(k[5]).float().cpu() for k in kept], dim=1)
        rec = run.stash.get(self, _Recorded)
        for j, k in enumerate(k for k in batch.indices if k < self.samples):
            rec.x0[k], rec.xt[k] = x0[j], xt[j]
        if not rec.columns:
            rec.columns = [dict(step=i, sigma=s, sigma_next=sn, nfe=n) for i, s, sn, n, _, _ in kept]

    @hookimpl
    def run_end(self, run, result):
        rec = run.stash.get(self, _Recorded)
        if run.output_dir is None or not rec.x0:
            return
        x0, xt = rec.images()
        rows, cols = x0.shape[:2]
        for name, imgs in (("preview.png", x0), ("preview_xt.png", xt)):
            atomic_write_bytes(Path(run.output_dir) / name, png_bytes(grid(imgs.flatten(0, 1), nrow=cols, pad=PAD)))
        meta = dict(samples=sorted(rec.x0), rows=rows, cols=cols, height=x0.shape[-2], width=x0.shape[-1], pad=PAD, columns=rec.columns,
                    every=self.every, steps=result.schedule.steps)
        atomic_write_json(Path(run.output_dir) / "preview.json", meta)


def read_tiles(folder: str | Path, name: str = "preview.png") -> tuple[torch.Tensor, dict]:
    """The tiles of a preview grid written by this plugin, [rows, cols, 3, H, W] in [0, 1], and
    its ``preview.json``."""
    from PIL import Image

    folder = Path(folder)
    meta = json.loads((folder / "preview.json").read_text())
    arr = torch.from_numpy(np.asarray(Image.open(folder / name).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    h, w, p = meta["height"], meta["width"], meta["pad"]
    tiles = torch.stack([
        torch.stack([arr[:, p + r * (h + p): p + r * (h + p) + h, p + c * (w + p): p + c * (w + p) + w]
                     for c in range(meta["cols"])])
        for r in range(meta["rows"])
    ])
    return tiles, meta
