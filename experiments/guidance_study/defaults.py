"""The loss plugins' defaults, measured: each loss at every scale × guided-step pattern of
``defaults.yaml`` on the bundled model's default sampler, at equal seeds, against unguided samples.

    python -m experiments.guidance_study --config-name defaults   # docs/guidance/defaults.{md,json,png}

For each configuration: the effect (the loss on the guided images over the same loss on the
baseline's, and the mean blue channel), what it keeps (the bundled judge's colour and shape accuracy
of each prompt's main object), how far the pictures move (mean |guided − baseline| in pixels), and
for style the fraction of main objects the judge calls striped. The rule that picks a default:
among the configurations that keep the judge's accuracy on the loss's ``keep`` heads within
``keep_within`` of the baseline's (a loss that repaints the object, palette, keeps the shape only)
and whose loss ratio is within ``margin`` of the lowest of them, the former default if it is one,
else the one that keeps the accuracies best.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.guidance_study.figures import image_rows
from experiments.guidance_study.inputs import judge, make_files
from experiments.harness import instantiate, load_run, save_text
from framework.entry.api import run


def label(when: dict, scale: float | None = None) -> str:
    """``scale 0.3, every 1, σ ≤ 2`` (the scale left out when None)."""
    parts = [] if scale is None else [f"scale {scale:g}"]
    parts.append(f"every {when['every']}")
    if when.get("sigma_hi") is not None:
        parts.append(f"σ ≤ {when['sigma_hi']:g}")
    return ", ".join(parts)


def overrides(name: str, options: list[str], scale: float, when: dict) -> list[str]:
    """samplerlab overrides of one configuration (every mechanism option stated, so the plugin's
    YAML defaults do not leak in)."""
    hi = "null" if when.get("sigma_hi") is None else when["sigma_hi"]
    return [f"guidance=[cfg,{name}]", *(f"guidance.{name}.{o}" for o in options), f"guidance.{name}.scale={scale}",
            f"guidance.{name}.every={when['every']}", f"guidance.{name}.sigma_hi={hi}", f"guidance.{name}.sigma_lo=null",
            f"guidance.{name}.normalize=true"]


def loss_on(images: torch.Tensor, name: str, options: list[str]) -> float:
    """The plugin's mean loss on ``images`` (the baseline's), as the record reports it for guided runs."""
    loaded = load_run([f"guidance=[cfg,{name}]", *(f"guidance.{name}.{o}" for o in options), "device=cpu"])
    plugin = instantiate(loaded.cfg.guidance[name], name)
    context = plugin.setup(SimpleNamespace(model=loaded.model, device=torch.device("cpu"), dtype=torch.float32))
    with torch.no_grad():
        return float(plugin.loss(images.float(), context).mean())


def measure(res, base_images: torch.Tensor | None = None) -> dict:
    m, img = res.record["metrics"], res.images
    row = {"colour": m.get("prompt_accuracy_colour"), "shape": m.get("prompt_accuracy_shape"),
           "mean_blue": float(img[:, 2].mean()), "striped": float((judge(img)["striped"] == 1).float().mean()),
           "nfe": m["nfe"], "seconds": m["seconds"]}
    if base_images is not None:
        row["pixel_change"] = float((img - base_images).abs().mean())
    return row


def same(row: dict, setting: dict) -> bool:
    return (row["scale"], row["every"], row["sigma_hi"]) == (setting["scale"], setting["every"], setting["sigma_hi"])


def choose(rows: list[dict], base: dict, keep: list[str], within: float, former: dict, margin: float) -> dict | None:
    """The setting for a default (None when no row keeps the accuracies): among the rows whose judge
    accuracy on ``keep`` stays within ``within`` of the baseline's and whose loss ratio is within
    ``margin`` of the lowest such ratio (effects the samples cannot tell apart), the former default
    when it is one of them, else the one that keeps the accuracies best (then: the lower ratio)."""
    kept = [r for r in rows if all(r[h] >= base[h] - within - 1e-9 for h in keep)]
    if not kept:
        return None
    low = min(r["loss_ratio"] for r in kept)
    near = [r for r in kept if r["loss_ratio"] <= low + margin + 1e-9]
    old = next((r for r in near if same(r, former)), None)
    return old or max(near, key=lambda r: (min(r[h] for h in keep), -r["loss_ratio"]))


def decide(results: dict, cfg: DictConfig) -> None:
    """Each loss's ``chosen`` setting (scale, every, sigma_hi), by :func:`choose`."""
    for res in results["losses"].values():
        pick = choose(res["rows"], results["baseline"], res["keep"], cfg.keep_within, res["former"], cfg.margin)
        res["chosen"] = None if pick is None else {k: pick[k] for k in ("scale", "every", "sigma_hi")}


def common_overrides(n: int, steps: int, cfg: DictConfig) -> list[str]:
    return ["model=bundled", f"steps={steps}", f"num_samples={n}", f"batch_size={n}", "seed=0",
            f"prompts=[{','.join(cfg.prompts)}]", "metrics=[prompt_accuracy]", "save_images=false"]


def sweep(cfg: DictConfig, folder: Path, out: Path) -> dict:
    """Every loss × scale × pattern; each row's measures (the choice is :func:`decide`'s)."""
    torch.set_num_threads(1)  # the build machine's cores are shared
    make_files(out / "guidance")
    n, steps = (4, 4) if cfg.fast else (cfg.samples, cfg.steps)
    losses = OmegaConf.to_container(cfg.losses, resolve=True)
    whens = OmegaConf.to_container(cfg.when, resolve=True)
    scales = list(cfg.scales)
    if cfg.fast:
        losses, whens, scales = dict(list(losses.items())[:1]), whens[:2], scales[:2]
    common = common_overrides(n, steps, cfg)
    base_res = run(common + ["guidance=[cfg]"], output_dir=folder / "runs" / "baseline")
    base = measure(base_res)
    results = {"steps": steps, "samples": n, "baseline": base, "losses": {}}
    todo = [(name, spec, when, s) for name, spec in losses.items() for when in whens for s in scales]
    rows: dict[str, list[dict]] = {name: [] for name in losses}
    for name, spec, when, s in tqdm(todo, desc="configurations"):
        tag = f"{name}_s{s:g}_e{when['every']}_hi{when.get('sigma_hi')}"
        res = run(common + overrides(name, spec["options"], s, when), output_dir=folder / "runs" / tag)
        row = {"scale": s, **when, **measure(res, base_res.images), "loss": res.record["metrics"][f"guidance_loss_{name}"]}
        rows[name].append(row)
    for name, spec in losses.items():
        base_loss = loss_on(base_res.images, name, spec["options"])
        for r in rows[name]:
            r["loss_ratio"] = r["loss"] / base_loss
        results["losses"][name] = {"options": spec["options"], "keep": spec["keep"], "former": spec["former"],
                                   "baseline_loss": base_loss, "rows": rows[name]}
    return results


def write(results: dict, cfg: DictConfig, folder: Path, out: Path) -> list[str]:
    """``<out>/guidance/defaults.md`` (a table per loss), ``defaults.json`` and ``defaults.png`` (the
    baseline, then each loss at its former and its chosen default, sampled again here: the first
    two seeds of each prompt)."""
    files: list[str] = []
    base = results["baseline"]
    n = min(8, results["samples"])
    common = common_overrides(n, results["steps"], cfg)
    lines = [f"Bundled model, karras/Euler/CFG 5, {results['steps']} steps, {results['samples']} samples; baseline (CFG only): colour accuracy "
             f"{base['colour']:.2f}, shape accuracy {base['shape']:.2f}, mean blue {base['mean_blue']:.3f}. Each cell: "
             "loss ratio (guided / baseline) · colour / shape accuracy · mean blue. **Bold**: the chosen default "
             f"(among the settings keeping the listed accuracies within {cfg.keep_within} of the baseline and "
             f"within {cfg.margin} of their lowest ratio: the former default if it is one, else the one keeping the "
             "accuracies best); *italic*: the former default.", ""]
    figure = [("baseline (CFG only)", run(common + ["guidance=[cfg]"], output_dir=folder / "figure" / "baseline").images)]
    for name, res in results["losses"].items():
        scales = sorted({r["scale"] for r in res["rows"]})
        whens = list(dict.fromkeys((r["every"], r["sigma_hi"]) for r in res["rows"]))
        chosen, former = res["chosen"], res["former"]
        opts = f" ({', '.join(res['options'])})" if res["options"] else ""
        lines += [f"### {name}{opts}", "",
                  f"baseline loss {res['baseline_loss']:.4g}; keeps: {', '.join(res['keep'])}", "",
                  "| guided steps | " + " | ".join(f"scale {s:g}" for s in scales) + " |",
                  "| --- |" + " --- |" * len(scales)]
        for every, hi in whens:
            cells = []
            for s in scales:
                r = next(r for r in res["rows"] if (r["scale"], r["every"], r["sigma_hi"]) == (s, every, hi))
                text = f"{r['loss_ratio']:.2f} · {r['colour']:.2f} / {r['shape']:.2f} · {r['mean_blue']:.2f}"
                if chosen and same(r, chosen):
                    text = f"**{text}**"
                elif same(r, former):
                    text = f"*{text}*"
                cells.append(text)
            lines.append(f"| {label({'every': every, 'sigma_hi': hi})} | " + " | ".join(cells) + " |")
        lines.append("")
        kept = chosen is not None and same(chosen, former)
        for tag, c in ((("default, unchanged" if kept else "former default"), former), ("chosen default", chosen)):
            if c is None or (tag == "chosen default" and kept):
                continue
            images = run(common + overrides(name, res["options"], c["scale"], c), output_dir=folder / "figure" / f"{name}_{tag[:6]}").images
            figure.append((f"{name}, {tag}: {label(c, c['scale'])}", images))
    docs = out / "guidance"
    save_text("\n".join(lines), docs / "defaults.md", files)
    save_text(json.dumps(results, indent=1), docs / "defaults.json", files)
    image_rows(figure, docs / "defaults.png", files)
    return files
