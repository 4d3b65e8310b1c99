"""img2img (SDEdit): one source image, a sweep over ``strength`` — how much of the image survives.

    python -m experiments.img2img                   # docs/deep_dive/img2img_strengths.png, img2img.json
    python -m experiments.img2img fast=true out=/tmp/dd
    python -m experiments.img2img model=sd15 source=photo 'prompts=[a watercolour painting of a pagoda]' out=/tmp/sd

Each strength is an ordinary samplerlab run with the img2img plugin (plugins/guidance/img2img.py,
``guidance=[cfg,img2img]``): the source is encoded, noised to the σ where the last
⌊steps·strength⌋ steps begin, and sampled from there with the prompt — so NFE shrinks with strength.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from experiments.deep_dive_common import (compose_experiment, entry, load_model, pixel_size, psnr, pyplot, require_vae,
                                          run_overrides, sample_photo, save_figure, save_png, show, world_scenes,
                                          write_record)
from framework.entry.api import run as sample
from framework.core.errors import ConfigError

HERE = Path(__file__).resolve().parent


def source_image(cfg, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """The source as [1, 3, H, W] in [0, 1] and a label."""
    if cfg.source == "scene":
        img, captions = world_scenes(1, cfg.scene_seed, size)
        return img, captions[0]
    if cfg.source == "photo":
        return sample_photo(size), "china.jpg"
    from plugins.guidance.img2img import load_image

    return load_image(str(cfg.source), size), Path(cfg.source).name


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment with Hydra-style overrides; returns its record (also written to ``out``)."""
    t0 = time.perf_counter()
    cfg, passed = compose_experiment(HERE, argv or [])
    strengths = [float(s) for s in cfg.strengths]
    if not strengths or any(not 0 < s <= 1 for s in strengths):
        raise ConfigError(f"img2img strengths must be in (0, 1], got {strengths}")
    base = run_overrides(cfg, passed)
    model = load_model(base)
    require_vae(model, "experiments.img2img")
    source, label = source_image(cfg, pixel_size(model))
    folder, out = Path(cfg.runs), Path(cfg.out)
    runs_files: list[str] = []
    save_png(source[0], folder / "source.png", runs_files)
    results, images = [], []
    for s in strengths:
        res = sample(base + [f"guidance.img2img.image={(folder / 'source.png').resolve()}", f"guidance.img2img.strength={s}"],
                     output_dir=folder / f"strength_{s:g}")
        imgs = res.images.cpu()
        images.append(imgs)
        results.append({"strength": s, "nfe": res.record["metrics"]["nfe"], "steps_sampled": res.schedule.steps,
                        "sigma_start": res.schedule.sigmas[0], "run_key": res.record["run_key"],
                        "psnr_to_source_db": psnr(imgs, source.expand_as(imgs))})
    prompt = res.record["config"]["prompts"][0]
    plt = pyplot()
    n = images[0].shape[0]
    fig, axes = plt.subplots(n, len(strengths) + 1, figsize=(1.55 * (len(strengths) + 1), 1.55 * n + 0.9), squeeze=False)
    for r in range(n):
        show(axes[r, 0], source[0], "source" if r == 0 else None)
        axes[r, 0].set_ylabel(f"seed {res.record['seed']}, sample {r}", fontsize=7)
        for j, row in enumerate(results):
            title = f"strength {row['strength']:g}\nσ₀={row['sigma_start']:.3g}, NFE {row['nfe']:g}" if r == 0 else None
            show(axes[r, j + 1], images[j][r], title)
    fig.suptitle(f"img2img from “{label}”\nprompt “{prompt}”", fontsize=8)
    fig.tight_layout()
    files: list[str] = []
    save_figure(fig, out / "img2img_strengths.png", files)
    return write_record(out, "img2img", cfg, passed, {"source": label, "prompt": prompt, "runs": results}, files,
                        time.perf_counter() - t0)


if __name__ == "__main__":
    entry(main)
