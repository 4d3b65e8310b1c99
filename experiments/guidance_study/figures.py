"""Figures of the guidance study: rows of sample images, each with its label in a column of its own
(so no label is cut at the figure's edge, whatever its length)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from experiments.harness import pyplot, save_figure

LABEL_IN = 2.6   # width of the label column, inches
TILE_IN = 0.8    # one 64-px sample, inches
PAD_IN = 0.08


def image_rows(rows: list[tuple[str, torch.Tensor]], path: Path, files: list[str] | None = None,
               title: str | None = None, tile: float = TILE_IN) -> None:
    """One row per (label, images [n, 3, H, W] in [0, 1]): the label (wrapped, right-aligned) in a
    column left of the images; the figure is sized to fit both (``tile``: inches per image)."""
    from framework.plugin import grid

    plt = pyplot()
    n = max(len(images) for _, images in rows)
    head = 0.35 if title else 0.1
    width = LABEL_IN + n * tile + 2 * PAD_IN
    height = head + len(rows) * (tile + PAD_IN) + PAD_IN
    fig = plt.figure(figsize=(width, height))
    if title:
        fig.text(0.5, 1 - 0.2 / height, title, ha="center", va="center", fontsize=9)
    for r, (label, images) in enumerate(rows):
        top = height - head - r * (tile + PAD_IN)
        ax = fig.add_axes(((LABEL_IN + PAD_IN) / width, (top - tile) / height, len(images) * tile / width,
                           tile / height))
        ax.imshow(grid(images.float().clamp(0, 1), nrow=len(images)).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        fig.text(LABEL_IN / width, (top - tile / 2) / height, "\n".join(textwrap.wrap(label, 34)),
                 ha="right", va="center", fontsize=7.5)
    save_figure(fig, path, files)


def file_stem(stem: str, model: str) -> str:
    """A study file's stem: ``stem`` for the VP model (its files keep their names), ``stem_<model>`` else."""
    return stem if model == "bundled" else f"{stem}_{model}"
