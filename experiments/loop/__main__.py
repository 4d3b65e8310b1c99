"""The sampling loop, step by step: x_t and the predicted x₀ at every step, with σ, NFE and guidance.

    python -m experiments.loop                      # docs/deep_dive/loop_strip.png, loop.gif, loop.json
    python -m experiments.loop fast=true out=/tmp/dd
    python -m experiments.loop model=sd15 solver=dpmpp_2m cfg_scale=7.5 'prompts=[a photo of a cat]' out=/tmp/sd

One ordinary samplerlab run with the ``preview`` callback (plugins/callback/preview.py), which
decodes each step's input x_t and predicted x₀ and writes ``preview.png``/``preview_xt.png``/
``preview.json`` in the run folder; this module turns them into a labelled strip and an animated GIF.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from experiments.harness import Experiment, entry, pyplot, save_figure, show
from framework.core.files import atomic_write_bytes
from framework.entry.api import run as sample
from framework.plugin import ConfigError, to_pil
from plugins.callback.preview import read_tiles

HERE = Path(__file__).resolve().parent


def guidance_label(config: dict) -> str:
    """A short description of the run's guidance plugins and their scales."""
    parts = []
    for name, params in (config.get("guidance") or {}).items():
        scale = params.get("scale")
        parts.append(f"{name} scale {scale:g}" if isinstance(scale, (int, float)) else name)
    return ", ".join(parts) or "none"


def run_label(record: dict) -> str:
    cfg = record["config"]
    model = cfg["model"].get("path") or cfg["model"]["_target_"].rsplit(".", 1)[-1].lower()
    solver = record["plugins"]["step"][0]
    schedule = record["plugins"].get("schedule", ["?"])[0]
    return f"model {model} · solver {solver} · schedule {schedule} · guidance {guidance_label(cfg)}"


def pick_columns(n: int, k: int) -> list[int]:
    """``k`` column indices spread evenly over ``n``, always including the first and the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def strip(x0: torch.Tensor, xt: torch.Tensor, meta: dict, record: dict, columns: list[int], path: Path, files: list[str]) -> None:
    plt = pyplot()
    rows = x0.shape[0]
    fig, axes = plt.subplots(2 * rows, len(columns), figsize=(1.15 * len(columns) + 0.6, 2.5 * rows + 0.9), squeeze=False)
    prompts = record["config"]["prompts"]
    for r in range(rows):
        for j, c in enumerate(columns):
            col = meta["columns"][c]
            title = f"step {col['step']}\nσ={col['sigma']:.3g}\nNFE {col['nfe']}" if r == 0 else None
            show(axes[2 * r, j], xt[r, c], title)
            show(axes[2 * r + 1, j], x0[r, c])
        axes[2 * r, 0].set_ylabel("x_t", fontsize=8)
        axes[2 * r + 1, 0].set_ylabel("predicted x₀", fontsize=8)
    shown = "; ".join(f"row {r + 1}: “{prompts[r % len(prompts)]}”" for r in range(rows))
    fig.suptitle(f"{run_label(record)}\n{shown}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)


def gif(x0: torch.Tensor, xt: torch.Tensor, meta: dict, record: dict, scale: int, frame_ms: int, path: Path,
        files: list[str]) -> None:
    """One frame per recorded step: a row per sample, [x_t | predicted x₀], with σ, NFE, guidance."""
    from PIL import Image, ImageDraw

    rows, cols, _, h, w = x0.shape
    th, tw, gap, head = h * scale, w * scale, 6, 44
    width = max(2 * tw + 3 * gap, 330)
    guid = guidance_label(record["config"])
    frames = []
    for c in range(cols):
        col = meta["columns"][c]
        frame = Image.new("RGB", (width, head + rows * (th + gap)), "white")
        draw = ImageDraw.Draw(frame)
        draw.text((gap, 4), f"step {col['step'] + 1}/{meta['steps']}   sigma {col['sigma']:.3g} -> {col['sigma_next']:.3g}", fill="black")
        draw.text((gap, 18), f"NFE {col['nfe']}   guidance {guid}", fill="black")
        draw.text((gap, 31), "x_t (decoded)", fill="gray")
        draw.text((2 * gap + tw, 31), "predicted x0", fill="gray")
        for r in range(rows):
            y = head + r * (th + gap)
            frame.paste(to_pil(xt[r, c]).resize((tw, th), Image.Resampling.NEAREST), (gap, y))
            frame.paste(to_pil(x0[r, c]).resize((tw, th), Image.Resampling.NEAREST), (2 * gap + tw, y))
        frames.append(frame)
    durations = [frame_ms] * (cols - 1) + [frame_ms * 6]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    atomic_write_bytes(path, buf.getvalue())
    files.append(path.name)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment with Hydra-style overrides; returns its record (also written to ``out``)."""
    ex = Experiment.compose(HERE, argv, passthrough=True)
    cfg = ex.cfg
    if cfg.samples < 1 or cfg.strip_columns < 2 or cfg.gif_scale < 1:
        raise ConfigError("loop needs samples ≥ 1, strip_columns ≥ 2 and gif_scale ≥ 1")
    out, folder = Path(cfg.out), Path(cfg.runs)
    result = sample(ex.run_overrides(), output_dir=folder)
    x0, meta = read_tiles(folder, "preview.png")
    xt, _ = read_tiles(folder, "preview_xt.png")
    files: list[str] = []
    columns = pick_columns(meta["cols"], cfg.strip_columns)
    strip(x0, xt, meta, result.record, columns, out / "loop_strip.png", files)
    gif(x0, xt, meta, result.record, cfg.gif_scale, cfg.frame_ms, out / "loop.gif", files)
    results = {
        "run_folder": str(folder),
        "run_key": result.record["run_key"],
        "label": run_label(result.record),
        "nfe": result.record["metrics"]["nfe"],
        "sampling_seconds": result.record["metrics"]["seconds"],
        "columns": meta["columns"],
        "last_column_vs_final_max_abs": float((x0[:, -1] - result.images[: x0.shape[0]].cpu()).abs().max()),
    }
    return ex.record(out / "loop.json", results, files)


if __name__ == "__main__":
    entry(main)
