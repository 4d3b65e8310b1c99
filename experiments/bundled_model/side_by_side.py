"""The model card's prompts under two or more bundled pipelines, side by side (issue 29's v2-vs-v3 picture):
``python -m experiments.bundled_model.side_by_side --out docs/v2_v3.png --pipeline v2=FOLDER --pipeline v3=FOLDER``.

A row per prompt of the card's grid (``evaluate.GRID_PROMPTS``); in each row every pipeline's ``--seeds``
images in turn, a white gap between pipelines. Sampling as in ``evaluate``: diffusers'
EulerDiscreteScheduler, ``--steps`` steps, CFG ``--cfg``, one generator per image seeded 0, 1, ... — the same
seeds for every pipeline (the initial noise itself differs where the latent shapes do).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from experiments.bundled_model.evaluate import GRID_PROMPTS, generate, grid_prompts, load_pipeline
from experiments.harness import save_pil
from framework.plugin import grid, to_pil


def pipeline_images(folder: str, seeds: int, steps: int, cfg: float) -> torch.Tensor:
    """[prompts, seeds, 3, H, W] in [0, 1] for GRID_PROMPTS from the pipeline folder."""
    prompts, seed_list = grid_prompts(seeds)
    images = generate(load_pipeline(folder), prompts, seed_list, steps, cfg, batch=len(prompts))
    return ((images.clamp(-1, 1) + 1) / 2).reshape(len(GRID_PROMPTS), seeds, *images.shape[1:])


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--pipeline", action="append", required=True, help="NAME=FOLDER of a StableDiffusionPipeline")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if any("=" not in spec for spec in a.pipeline):
        ap.error("--pipeline takes NAME=FOLDER, e.g. --pipeline v2=framework/bundled/weights/pipeline")
    torch.set_num_threads(a.threads)
    blocks = []
    for spec in a.pipeline:
        name, folder = spec.split("=", 1)
        block = grid(pipeline_images(folder, a.seeds, a.steps, a.cfg).flatten(0, 1), nrow=a.seeds, pad=1)
        blocks += [block, torch.ones_like(block[:, :, :6])]  # a 6-px white gap after each pipeline
        print(f"{name}: {folder}", flush=True)
    img = to_pil(torch.cat(blocks[:-1], dim=2))
    save_pil(img.resize((img.width * 2, img.height * 2), Image.Resampling.NEAREST), a.out)
    print(f"wrote {a.out} (a row per prompt: {', '.join(s.split('=', 1)[0] for s in a.pipeline)}, "
          f"{a.seeds} seeds each)")
    return a.out


if __name__ == "__main__":
    main()
