"""The deep dive's gallery: samplers, guidance and text embeddings side by side at equal seeds.

    python -m experiments.gallery                   # docs/deep_dive/gallery_<section>.png, gallery.json
    python -m experiments.gallery fast=true out=/tmp/dd
    python -m experiments.gallery 'only=[guidance]' model=sd15 'prompts=[a photo of a cat]' out=/tmp/sd

``sections`` (config.yaml) maps a section name to its rows; a row is a list of samplerlab overrides,
one ordinary run whose samples (same seeds, same prompts in every row unless the row changes them)
fill one row of the section's figure, labelled with its overrides, NFE and seconds.
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from experiments.deep_dive_common import compose_experiment, entry, pyplot, run_overrides, save_figure, show, write_record
from framework.api import run as sample
from framework.errors import ConfigError

HERE = Path(__file__).resolve().parent


def section_figure(name: str, rows: list[dict], path: Path, files: list[str]) -> None:
    plt = pyplot()
    n = max(r["images"].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 2.6, 1.35 * len(rows) + 0.5), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n):
            if j < row["images"].shape[0]:
                show(axes[i, j], row["images"][j], f"“{row['prompts'][j % len(row['prompts'])]}”" if i == 0 or row["own_prompts"] else None)
            else:
                axes[i, j].axis("off")
        label = "\n".join(row["overrides"]) or "(defaults)"
        axes[i, 0].set_ylabel(f"{label}\nNFE {row['nfe']:g}", fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.title.set_fontsize(5)
    fig.suptitle(f"{name} (same seeds in every row)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment with Hydra-style overrides; returns its record (also written to ``out``)."""
    t0 = time.perf_counter()
    cfg, passed = compose_experiment(HERE, argv or [])
    sections = OmegaConf.to_container(cfg.sections)
    if not isinstance(sections, dict) or not all(isinstance(v, list) and all(isinstance(r, list) for r in v) for v in sections.values()):
        raise ConfigError("gallery.sections must map a name to a list of override lists, e.g. 'sections.x=[[solver=heun],[solver=euler]]'")
    if cfg.only is not None:
        unknown = sorted(set(cfg.only) - set(sections))
        if unknown:
            raise ConfigError(f"unknown gallery section(s) {', '.join(unknown)}: choose from {', '.join(sections)}")
        sections = {k: v for k, v in sections.items() if k in cfg.only}
    base = run_overrides(cfg, passed)
    out, folder = Path(cfg.out), Path(cfg.runs)
    files: list[str] = []
    results: dict[str, list[dict]] = {}
    for name, rows in sections.items():
        done = []
        for i, overrides in enumerate(rows[: cfg.fast_rows] if cfg.fast else rows):
            overrides = [str(o) for o in overrides]
            t = time.perf_counter()
            res = sample(base + overrides, output_dir=folder / name / f"{i:02d}")
            rec = res.record
            done.append({"overrides": overrides, "images": res.images.cpu(), "prompts": rec["config"]["prompts"],
                         "own_prompts": any(o.startswith("prompts=") for o in overrides), "nfe": rec["metrics"]["nfe"],
                         "seconds": time.perf_counter() - t, "run_key": rec["run_key"]})
        section_figure(name, done, out / f"gallery_{name}.png", files)
        results[name] = [{k: v for k, v in row.items() if k != "images"} for row in done]
    return write_record(out, "gallery", cfg, passed, results, files, time.perf_counter() - t0)


if __name__ == "__main__":
    entry(main)
