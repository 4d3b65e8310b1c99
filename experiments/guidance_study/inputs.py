"""The guidance study's input pictures: world scenes as reference, style and source images, and the
inpainting mask (right half white = generated), written to ``docs/guidance/`` with their captions."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from experiments.harness import save_png, save_text

MASK_SPLIT = 32
"""The inpainting mask's edge: columns ≥ 32 of the 64-px picture are generated."""


def make_files(folder: Path) -> dict[str, torch.Tensor]:
    """Reference, style and source pictures (world scenes) and the inpainting mask."""
    from framework.bundled.world import sample_scenes

    scenes = sample_scenes(40, seed=7, concept_rate=0.5)
    plain = [i for i, lab in enumerate(scenes.labels) if not lab.main.striped]
    pick = {"reference.png": plain[0], "source.png": plain[1]}
    pick["style.png"] = next(i for i, lab in enumerate(scenes.labels) if lab.main.striped)
    out = {}
    for name, i in pick.items():
        img = (scenes.images[i] + 1) / 2
        save_png(img, folder / name)
        out[name] = img
    mask = torch.zeros(1, 64, 64)
    mask[:, :, MASK_SPLIT:] = 1
    save_png(mask, folder / "mask.png")
    out["mask.png"] = mask
    save_text(json.dumps({n: scenes.captions[i] for n, i in pick.items()}, indent=1), folder / "captions.json")
    return out


def judge(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bundled judge's labels (class indices per head: colour, shape, striped) of images in [0, 1]."""
    from framework.bundled import load_judge

    return load_judge().predict(images.float().cpu() * 2 - 1)
