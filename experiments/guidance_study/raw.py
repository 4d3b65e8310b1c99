"""Why the Stable Diffusion deep dive's raw colour-loss update breaks the bundled model.

    python -m experiments.guidance_study --config-name raw     # docs/guidance/raw_update.{png,json}

The deep dive moves the latents by x ← x − scale·σ²·∇ₓloss every 5 steps, scale 200, where loss is a
mean over the decoded picture's pixels. ∇ₓ of a mean over N pixels is of the order k²/N per latent
element (k²: the pixels each latent element paints), so the same scale moves a 64-px picture's 16×16
latents (the bundled v3 model, k = 4) 16× further than a 512-px Stable Diffusion picture's 64×64
latents (k = 8), where the deep dive tuned it. Each guided step is noted by :class:`TracedColorLoss` (the correction's RMS over σ, and the RMS of the predicted
x0 latents after it); the figure shows those per step and per picture size, and the predicted x0
(the ``preview`` callback) step by step for one sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.guidance_study.figures import image_rows
from experiments.harness import load_model, pyplot, resize, save_figure, save_text, world_scenes
from framework.entry.api import run
from plugins.guidance.color_loss import ColorLoss
from plugins.callback.preview import read_tiles


@dataclass
class TracedColorLoss(ColorLoss):
    """color_loss noting each correction in the run's metrics: ``trace_<step>_shift`` (the
    correction's RMS over σ, mean over samples), ``trace_<step>_x0`` (RMS of the predicted x0
    latents after it) and ``trace_<step>_sigma``."""

    def correct(self, state, pred, x):
        out = super().correct(state, pred, x)
        rms = (out.x - pred.x).flatten(1).pow(2).mean(1).sqrt().mean()
        step = f"trace_{state.index:02d}"
        state.run.metrics.update({f"{step}_sigma": pred.sigma, f"{step}_shift": float(rms) / pred.sigma,
                                  f"{step}_x0": float(out.denoised.flatten(1).pow(2).mean(1).sqrt().mean())})
        return out


def trace(metrics: dict) -> list[dict]:
    """The guided steps noted by :class:`TracedColorLoss`, in step order."""
    steps = sorted({k.split("_")[1] for k in metrics if k.startswith("trace_")})
    return [{"step": int(s), "sigma": metrics[f"trace_{s}_sigma"], "shift": metrics[f"trace_{s}_shift"],
             "x0": metrics[f"trace_{s}_x0"]} for s in steps]


def configs(cfg: DictConfig) -> dict[str, list[str]]:
    traced = ["guidance=[cfg,color_loss]", f"guidance.color_loss._target_={__name__}.TracedColorLoss"]
    deep_dive = ["guidance.color_loss.normalize=false", "guidance.color_loss.every=5", "guidance.color_loss.sigma_hi=null"]
    d = ColorLoss()
    window = "" if d.sigma_hi is None else f", σ ≤ {d.sigma_hi:g}"
    out = {"CFG only": ["guidance=[cfg]"], f"normalised default ({d.scale:g}·σ, every {d.every}{window})": traced}
    for s in cfg.raw_scales:
        out[f"raw {s:g}, every 5 (64 px)"] = traced + deep_dive + [f"guidance.color_loss.scale={s}"]
    for px in cfg.sizes[1:]:
        size = [f"model.height={px}", f"model.width={px}"]
        if px == cfg.sizes[1]:
            out[f"CFG only ({px} px)"] = ["guidance=[cfg]", *size]
        out[f"raw {cfg.raw_scales[-1]:g}, every 5 ({px} px)"] = traced + deep_dive + [f"guidance.color_loss.scale={cfg.raw_scales[-1]}", *size]
    return out


def study(cfg: DictConfig, folder: Path, out: Path) -> tuple[dict, dict]:
    torch.set_num_threads(1)  # the build machine's cores are shared
    steps, n = (4, 2) if cfg.fast else (cfg.steps, cfg.num_samples)
    common = ["model=bundled", f"steps={steps}", f"num_samples={n}", f"batch_size={n}", "seed=0", f"prompts=[{cfg.prompt}]",
              "metrics=[prompt_accuracy]", "save_images=false", "callback=[nan_guard,preview]", "callback.preview.samples=1"]
    todo = configs(cfg)
    if cfg.fast:
        todo = dict(list(todo.items())[:3])
    model = load_model(["model=bundled", "device=cpu"])
    scenes, _ = world_scenes(16, 0, (64, 64))
    with torch.no_grad():
        data_rms = float(model.encode_images(scenes).flatten(1).pow(2).mean(1).sqrt().mean())
    results, strips = {"steps": steps, "samples": n, "data_latent_rms": data_rms, "runs": {}}, {}
    for name, extra in todo.items():
        where = folder / "runs" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("·", "")
        res = run(common + extra, output_dir=where)
        m = res.record["metrics"]
        results["runs"][name] = {"trace": trace(m), "mean_blue": float(res.images[:, 2].mean()),
                                 "accuracy_colour": m.get("prompt_accuracy_colour"), "accuracy_shape": m.get("prompt_accuracy_shape")}
        tiles, meta = read_tiles(where)
        strips[name] = (resize(tiles[0], (64, 64)), [c["sigma"] for c in meta["columns"]])
    return results, strips


def write(results: dict, strips: dict, cfg: DictConfig, out: Path) -> list[str]:
    """``raw_update.png`` (the corrections per step and per picture size) and ``raw_update_steps.png``
    (the predicted x0 step by step), ``raw_update.json``."""
    plt = pyplot()
    folder, files = out / "guidance", []
    runs = results["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, r in runs.items():
        if r["trace"]:
            left.loglog([t["sigma"] for t in r["trace"]], [t["shift"] for t in r["trace"]], marker="o", label=name)
    left.axhline(1.0, color="black", linestyle=":", linewidth=1)
    left.invert_xaxis()
    left.text(0.4, 1.12, "correction as large as the noise itself", fontsize=7, transform=left.get_yaxis_transform())
    left.set(xlabel="σ of the guided step (sampling runs right to left)", ylabel="RMS of the correction / σ",
             title="the latent correction at each guided step")
    left.legend(fontsize=7)
    left.grid(True, which="both", alpha=0.3)
    sized = [(int(name.split("(")[1].split(" ")[0]), r) for name, r in runs.items() if name.startswith(f"raw {cfg.raw_scales[-1]:g},")]
    if sized:
        px = [p for p, _ in sized]
        first = [r["trace"][0]["shift"] for _, r in sized]
        last = [r["trace"][-1] for _, r in sized]
        right.loglog(px, first, marker="o", label=f"first correction / σ (σ = {sized[0][1]['trace'][0]['sigma']:.1f})")
        right.loglog(px, [t["x0"] for t in last], marker="s",
                     label=f"RMS of the predicted x0 latents at the last guided step (σ = {last[0]['sigma']:.2f})")
        ref = [first[0] * (px[0] / p) ** 2 for p in px + [512]]
        right.loglog(px + [512], ref, color="grey", linestyle="--", linewidth=1, label="∝ 1/pixels, to SD's 512 px")
        right.axhline(results["data_latent_rms"], color="black", linestyle=":", linewidth=1,
                      label=f"RMS of data latents ({results['data_latent_rms']:.2f})")
        right.set_xticks(px + [512], [str(p) for p in px + [512]])
        right.minorticks_off()
        right.set(xlabel="picture size (px)", title=f"raw scale {cfg.raw_scales[-1]:g} (the deep dive's) per picture size")
        right.legend(fontsize=7, loc="lower left")
        right.grid(True, which="both", alpha=0.3)
    else:
        right.set_visible(False)
    save_figure(fig, folder / "raw_update.png", files)
    rows = []
    shown = [n for n in strips if not (n.startswith(f"raw {cfg.raw_scales[0]:g},") or f"({cfg.sizes[-1]} px)" in n)] or list(strips)
    for name, (tiles, sigmas) in ((n, strips[n]) for n in shown):
        r = runs[name]
        acc = "" if r["accuracy_colour"] is None else f"; colour/shape acc. {r['accuracy_colour']:.2f}/{r['accuracy_shape']:.2f}"
        rows.append((f"{name}: mean blue {r['mean_blue']:.2f}{acc}", tiles))
    sig = next(iter(strips.values()))[1]
    image_rows(rows, folder / "raw_update_steps.png", files, tile=0.55,
               title=f"predicted x0 after each step's guidance, sample 0 of \"{cfg.prompt}\" (σ {sig[0]:.1f} → {sig[-1]:.2f}); "
                     f"the model was trained at 64 px (larger sizes run outside its training)")
    save_text(json.dumps(results, indent=1), folder / "raw_update.json", files)
    return files
