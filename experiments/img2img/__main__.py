"""img2img (SDEdit): one source image, a sweep over ``strength`` — how much of the image survives.

    python -m experiments.img2img                   # docs/deep_dive/img2img_strengths.png, img2img.json
    python -m experiments.img2img fast=true out=/tmp/dd
    python -m experiments.img2img model=sd15 source=photo 'prompts=[a watercolour painting of a pagoda]' out=/tmp/sd

Each strength is an ordinary samplerlab run with the img2img plugin (plugins/guidance/img2img.py,
``guidance=[cfg,img2img]``): the source is encoded, noised to the σ where the last
⌊steps·strength⌋ steps begin, and sampled from there with the prompt — so NFE shrinks with strength.
"""
from __future__ import annotations

from pathlib import Path

import torch

from experiments.harness import (Experiment, entry, load_model, psnr, pyplot, require_vae, sample_photo, save_figure, save_png,
                                 show, world_scenes)
from framework.entry.api import run as sample
from framework.plugin import ConfigError, load_image, pixel_size

HERE = Path(__file__).resolve().parent


def source_image(cfg, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """The source as [1, 3, H, W] in [0, 1] and a label."""
    if cfg.source == "scene":
        img, captions = world_scenes(1, cfg.scene_seed, size)
        return img, captions[0]
    if cfg.source == "photo":
        return sample_photo(size), "china.jpg"
    return load_image(str(cfg.source), size, "source"), Path(cfg.source).name


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment with Hydra-style overrides; returns its record (also written to ``out``)."""
    ex = Experiment.compose(HERE, argv, passthrough=True)
    cfg = ex.cfg
    strengths = [float(s) for s in cfg.strengths]
    if not strengths or any(not 0 < s <= 1 for s in strengths):
        raise ConfigError(f"img2img strengths must be in (0, 1], got {strengths}")
    base = ex.run_overrides()
    model = load_model(base)
    require_vae(model, "experiments.img2img")
    source, label = source_image(cfg, pixel_size(model))
    folder, out = Path(cfg.runs), Path(cfg.out)
    save_png(source[0], folder / "source.png")
    results, images = [], []
    for s in strengths:
        res = sample(base + [f"guidance.img2img.image={(folder / 'source.png').resolve()}", f"guidance.img2img.strength={s}"],
                     output_dir=folder / f"strength_{s:g}")
        imgs = res.images.cpu()
        images.append(imgs)
        results.append({"strength": s, "nfe": res.record["metrics"]["nfe"], "steps_sampled": res.schedule.steps,
                        "sigma_start": res.schedule.sigmas[0], "run_key": res.record["run_key"],
                        "psnr_to_source_db": psnr(imgs, source.expand_as(imgs)).tolist()})
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
    return ex.record(out / "img2img.json", {"source": label, "prompt": prompt, "runs": results}, files)


if __name__ == "__main__":
    entry(main)
