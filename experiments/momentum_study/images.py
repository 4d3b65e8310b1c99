"""The image half of the momentum study: momentum × beta × steps × CFG scale on a bundled model
(``model``: bundled, the VP UNet, or bundled_flow, the flow transformer), scored by FID
(bundled-CLIP features, plugins/metrics/fid.py) and CLIP score vs NFE.

    python -m experiments.momentum_study --config-name bundled           # writes docs/momentum_bundled*
    python -m experiments.momentum_study --config-name bundled model=bundled_flow   # docs/momentum_bundled_flow*
    python -m experiments.momentum_study --config-name bundled fast=true out=/tmp/x

One process, one loop of framework.entry.api.run calls (torch on one thread: measured 5–8× faster than
two threads on the shared 2-core machine). Every finished configuration is appended to
``results.json`` in the Hydra run folder at once, so an interrupted study keeps what it measured.
The FID noise floor is measured two ways: real-vs-real (fresh real sets of the generated size
against the same 256-scene reference) and the baseline at a second seed.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.harness import pyplot, save_figure, save_pil, save_text
from framework.core.files import atomic_write_json
from framework.entry.api import run
from framework.plugin import grid, to_pil


def model_version(model: str = "bundled") -> dict[str, str]:
    """The bundled model used: its card's title, last commit of the weights, hash of the network file."""
    from framework.bundled import PIPELINE_DIR, WEIGHTS_DIR

    root = Path(PIPELINE_DIR).resolve().parents[1]
    card, network = {"bundled": ("MODEL_CARD.md", Path(PIPELINE_DIR) / "unet"),
                     "bundled_flow": ("MODEL_CARD_flow.md", Path(WEIGHTS_DIR) / "flow" / "transformer")}[model]
    title = (root / card).read_text().splitlines()[0].lstrip("# ").strip()
    digest = hashlib.sha256((network / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:12]
    try:
        sha = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(root / "weights")], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(root / "weights")], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", ""
    return {"title": title, "weights_commit": sha + (" (modified since)" if dirty else ""), "network_sha256": digest}


def stem(cfg: DictConfig) -> str:
    """The output files' stem: momentum_bundled (the VP model) or momentum_bundled_flow."""
    return f"momentum_{cfg.model}"


def clipped_fraction(images: torch.Tensor) -> float:
    """Fraction of decoded pixel values at the clamp (0 or 1): a saturation/divergence indicator."""
    return float(((images <= 0) | (images >= 1)).float().mean())


def real_noise_floor(n: int, reference: int, reference_seed: int, seeds: list[int]) -> list[float]:
    """FID between fresh real sets of ``n`` scenes and the ``reference`` set the fid plugin uses."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from framework.bundled.world import sample_scenes
    from framework.metrics.clip_features import BundledCLIPFeatures

    features = BundledCLIPFeatures()
    ref = (sample_scenes(reference, seed=reference_seed).images + 1) / 2
    out = []
    for s in seeds:
        fid = FrechetInceptionDistance(feature=features, normalize=True, input_img_size=(3, 64, 64))
        fid.update(ref, real=True)
        fid.update((sample_scenes(n, seed=s).images + 1) / 2, real=False)
        out.append(float(fid.compute()))
    return out


def study(cfg: DictConfig, folder: Path) -> dict[str, Any]:
    """Run every (method, CFG scale, steps) and the baseline at the floor seed; returns the results."""
    torch.set_num_threads(int(cfg.threads))
    methods = OmegaConf.to_container(cfg.methods)
    steps, scales = list(cfg.steps), list(cfg.cfg_scales)
    n, ref = int(cfg.num_samples), int(cfg.fid_reference)
    if cfg.fast:
        methods = {k: methods[k] for k in list(methods)[:2]}
        steps, scales, n, ref = steps[:1], scales[:1], 4, 16
    model = cfg.model
    base = [f"model={model}", f"solver={cfg.solver}", f"num_samples={n}", f"batch_size={n}", "callback=[]",
            "metrics=[fid,clip_score]", "save_images=false", f"metrics.fid.reference={ref}"]
    results: dict[str, Any] = {"model": model_version(model), "num_samples": n, "fid_reference": ref, "runs": []}
    earlier = _earlier_runs(folder / "results.json", results)
    t0 = time.perf_counter()
    first = next(iter(methods))
    jobs = []  # fewest steps first (where momentum matters): an interrupted study keeps whole columns
    for s in steps:
        for c in scales:
            jobs += [(name, extra, c, s, cfg.seed) for name, extra in methods.items()]
            if cfg.floor_seed is not None:
                jobs.append((first, methods[first], c, s, cfg.floor_seed))  # the seed-to-seed spread
    for name, extra, c, s, seed in tqdm(jobs, desc=f"momentum study ({model})"):
        if (name, c, s, seed) in earlier:  # measured by an interrupted invocation with the same settings
            results["runs"].append(earlier[name, c, s, seed])
            continue
        res = run(base + list(extra) + [f"cfg_scale={c}", f"steps={s}", f"seed={seed}"],
                  output_dir=folder / "runs" / f"{name}_cfg{c}_{s}_seed{seed}")
        m = res.record["metrics"]
        results["schedule"] = res.record["plugins"]["schedule"][0]
        results["runs"].append({"method": name, "cfg_scale": c, "steps": s, "seed": seed, "nfe": m["nfe"],
                                "fid": m["fid"], "clip_score": m["clip_score"], "seconds": m["seconds"],
                                "clipped": clipped_fraction(res.images)})
        atomic_write_json(folder / "results.json", results)
    if cfg.floor_seed is not None:
        floor_seeds = [cfg.floor_seed + k for k in range(2 if cfg.fast else 5)]
        results["real_vs_real_fid"] = real_noise_floor(n, ref, 1234, floor_seeds)
    results["seconds"] = time.perf_counter() - t0
    atomic_write_json(folder / "results.json", results)
    return results


def _earlier_runs(path: Path, results: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """The rows an interrupted study with the same model weights and sample counts wrote to ``path``,
    by (method, CFG scale, steps, seed). Its run folders keep only latents (save_images=false), so
    the decoded-image measures (``clipped``) could not be recomputed from them on resume."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if any(old.get(k) != results[k] for k in ("model", "num_samples", "fid_reference")):
        return {}
    if "schedule" in old:
        results["schedule"] = old["schedule"]
    return {(r["method"], r["cfg_scale"], r["steps"], r["seed"]): r for r in old.get("runs", [])}


def as_list(value: Any) -> list[str]:
    """One path or a list of paths (Hydra gives a ListConfig for ``[a,b]``)."""
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of several invocations with the same settings (e.g. extra methods run later) as one."""
    first = parts[0]
    for p in parts[1:]:
        if (p["model"], p["num_samples"], p["fid_reference"]) != (first["model"], first["num_samples"], first["fid_reference"]):
            raise ValueError("these results.json files differ in model, num_samples or fid_reference: not mergeable")
    merged = dict(first, runs=[r for p in parts for r in p["runs"]])
    floors = [p["real_vs_real_fid"] for p in parts if "real_vs_real_fid" in p]
    if floors:
        merged["real_vs_real_fid"] = floors[0]
    return merged


def write(results: dict[str, Any], cfg: DictConfig, out: Path) -> list[str]:
    """Tables (markdown) and a plot (FID and CLIP score vs NFE, one column per CFG scale); returns
    the names of the files written."""
    plt = pyplot()
    files: list[str] = []
    runs = [r for r in results["runs"] if r["seed"] == cfg.seed]
    floor_runs = [r for r in results["runs"] if r["seed"] != cfg.seed]
    present = list(dict.fromkeys(r["method"] for r in runs))
    methods = [m for m in cfg.methods if m in present] + [m for m in present if m not in cfg.methods]
    steps = sorted({r["steps"] for r in runs})
    scales = sorted({r["cfg_scale"] for r in runs})
    get = {(r["method"], r["cfg_scale"], r["steps"]): r for r in runs}
    rr = results.get("real_vs_real_fid", [])
    mv = results["model"]
    lines = [f"Bundled model `{mv['title']}` (weights commit {mv['weights_commit']}, network sha256 "
             f"{mv.get('network_sha256', mv.get('unet_sha256'))}); "
             f"{results['num_samples']} samples per configuration (seed {cfg.seed}, the 4 default prompts in turn), "
             f"base `solver={cfg.solver}`, {results.get('schedule', 'karras')} grid; NFE = steps (a CFG pair is one NFE). FID on bundled-CLIP "
             f"features against {results['fid_reference']} fresh real scenes (lower is better); CLIP score under "
             f"the bundled CLIP (higher is better); clipped = fraction of decoded pixel values at 0 or 1."
             + f" Sampling and scoring time {sum(r['seconds'] for r in results['runs']) / 60:.0f} min in all "
             f"({len(results['runs'])} runs, one thread of a shared 2-core CPU).", ""]
    if rr:
        mean = sum(rr) / len(rr)
        sd = (sum((v - mean) ** 2 for v in rr) / max(1, len(rr) - 1)) ** 0.5
        lines += [f"**Noise floor.** Real vs real ({results['num_samples']} fresh real scenes against the same "
                  f"reference, {len(rr)} seeds): FID {mean:.3f} ± {sd:.3f} (min {min(rr):.3f}, max {max(rr):.3f})."]
    if floor_runs:
        pairs = [(r, get[(r["method"], r["cfg_scale"], r["steps"])]) for r in floor_runs
                 if (r["method"], r["cfg_scale"], r["steps"]) in get]
        if pairs:
            fid = [abs(a["fid"] - b["fid"]) for a, b in pairs]
            clip = [abs(a["clip_score"] - b["clip_score"]) for a, b in pairs]
            lines += [f"Baseline `{floor_runs[0]['method']}` at seed {floor_runs[0]['seed']} vs seed {cfg.seed}: "
                      f"|ΔFID| mean {sum(fid) / len(fid):.3f}, max {max(fid):.3f}; |ΔCLIP score| mean "
                      f"{sum(clip) / len(clip):.2f}, max {max(clip):.2f} over {len(pairs)} configurations; "
                      "differences below these are noise."]
    lines.append("")
    for key, fmt in (("fid", "{:.3f}"), ("clip_score", "{:.2f}"), ("clipped", "{:.3f}")):
        for c in scales:
            lines += [f"**{key}, CFG {c}** (columns: steps = NFE)", "",
                      "| method | " + " | ".join(str(s) for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
            for name in methods:
                cells = [fmt.format(get[(name, c, s)][key]) if (name, c, s) in get else "—" for s in steps]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(2, len(scales), figsize=(5.0 * len(scales) + 2.2, 7), squeeze=False, layout="constrained")
    for j, c in enumerate(scales):
        floor = [r for r in floor_runs if r["cfg_scale"] == c]
        # this column's NFE only: a CFG scale measured at fewer step counts gets no empty axis beyond its data
        nfe = sorted({r["nfe"] for r in runs if r["cfg_scale"] == c} | {r["nfe"] for r in floor})
        for i, key in enumerate(("fid", "clip_score")):
            ax = axes[i][j]
            for k, name in enumerate(methods):
                pts = [(get[(name, c, s)]["nfe"], get[(name, c, s)][key]) for s in steps if (name, c, s) in get]
                if pts:
                    ax.plot(*zip(*pts), marker="os^vD<>"[k % 7], label=name)
            if key == "fid" and rr:
                ax.axhspan(min(rr), max(rr), color="grey", alpha=0.25, label="real vs real (range)")
            if floor:
                ax.plot(*zip(*sorted((r["nfe"], r[key]) for r in floor)), color="black", linestyle=":", marker="x",
                        label=f"{methods[0]}, seed {floor_runs[0]['seed']}")
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(nfe, [f"{n:g}" for n in nfe])
            ax.set_xlim(nfe[0] / 1.12, nfe[-1] * 1.12)
            ax.set_xlabel("NFE")
            ax.set_ylabel("FID (bundled CLIP)" if key == "fid" else "CLIP score")
            ax.set_title(f"CFG {c}: {'FID' if key == 'fid' else 'CLIP score'} vs NFE")
            ax.grid(True, alpha=0.3)
    legend = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    handles, labels = list(legend.values()), list(legend)
    axes[0][-1].legend(handles, labels, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    save_figure(fig, out / f"{stem(cfg)}.png", files)
    save_text("\n".join(lines), out / f"{stem(cfg)}_table.md", files)
    return files


def sample_grid(cfg: DictConfig, out: Path) -> list[str]:
    """A picture of what the tables measure: one row of ``grid.num_samples`` images per entry of
    ``grid.rows`` (label: overrides), same seed and noise in every row."""
    from PIL import Image, ImageDraw

    torch.set_num_threads(int(cfg.threads))
    g = cfg.grid
    entries, n = list(g.rows.items()), int(g.num_samples)
    if cfg.fast:
        entries, n = entries[:2], 2
    rows, labels = [], []
    for label, extra in entries:
        res = run([f"model={cfg.model}", f"solver={cfg.solver}", f"steps={g.steps}", f"num_samples={n}", f"batch_size={n}", "callback=[]", "save_images=false", f"seed={cfg.seed}"] + list(extra))
        rows.append(res.images.float().cpu())
        labels.append(str(label))
    h = rows[0].shape[-2]
    img = to_pil(grid(torch.cat(rows), nrow=n, pad=0))
    img = img.resize((img.width * 2, img.height * 2), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (img.width + 220, img.height), "white")
    canvas.paste(img, (220, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((6, i * 2 * h + h - 6), label, fill="black")
    files: list[str] = []
    save_pil(canvas, out / f"{stem(cfg)}_samples.png", files)
    return files
