"""The CFG family and perturbation guidance on a bundled model, at matched NFE and equal seeds.

    python -m experiments.guidance_study --config-name methods   # docs/guidance/methods.{md,json,png}
    python -m experiments.guidance_study --config-name methods model=bundled_flow   # …/methods_bundled_flow.*
    python -m experiments.guidance_study --config-name methods fast=true out=/tmp/x runs=/tmp/x/runs

Every configuration of ``methods.yaml`` (a guidance method at a CFG scale w and, where it has one,
its own scale) is an ordinary samplerlab run (framework.entry.api.run) on the model's (``model``:
bundled or bundled_flow) default sampler (Euler on karras, or on flow_match for the flow model) with the step count that spends ``budget_pairs`` CFG pairs — the
papers' convention, the record's ``nfe_pairs`` = network inputs / 2: CFG 1 per step, CFG + a
perturbed branch 1.5 — and the same prompts and noise seeds. Measured per configuration, on each of
two disjoint sets (prompts = captions of fresh world scenes, noise seeds: both disjoint):

- the bundled judge's prompt accuracy (colour and shape of the main object; ``metrics=[prompt_accuracy]``),
- FD to real world scenes in the bundled CLIP's image features (``metrics=[fid]``, features=clip),
- the CLIP score of image and prompt (``metrics=[clip_score]``),
- saturation (mean HSV saturation) and contrast (RMS contrast: the std of the luma per image),
- seconds per image (the record's ``seconds_per_sample``: sampling and the metrics' per-batch work).

The difference between the two sets is each figure's noise floor. The real scenes whose captions
are the prompts give the ceiling (judge, CLIP score) and the target (saturation, contrast; the FD of
``samples`` real scenes is the FD floor at this sample count). A configuration's measures are kept
in ``<runs>/rows/`` (with its images) and reused by a rerun with the same settings, so a study
interrupted or extended (``only=[…]``) samples only what is missing. A method the model cannot run
(a configuration error, e.g. the VP guide network for the flow transformer) is listed with the reason.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.guidance_study.figures import file_stem, image_rows
from experiments.harness import save_text
from framework.entry.api import run
from framework.plugin import ConfigError

FIGURES = ("colour", "shape", "fd", "clip_score", "saturation", "contrast", "seconds_per_image")
BETTER = {"colour": 1, "shape": 1, "fd": -1, "clip_score": 1}  # the figures with a better direction


# --- the configurations ----------------------------------------------------------------------------

def pairs(steps: int, extra: float = 0.0, window: tuple[float, float] = (0.0, 1.0)) -> float:
    """CFG pairs of ``steps`` steps whose guided steps (⌊start·N⌋ ≤ i < ⌊stop·N⌋) add ``extra`` each."""
    start, stop = window
    return steps + extra * (math.floor(stop * steps) - math.floor(start * steps))


def steps_for(budget: float, extra: float = 0.0, window: tuple[float, float] = (0.0, 1.0)) -> int:
    """The step count whose CFG pairs come closest to ``budget`` (the fewer steps on a tie)."""
    return min(range(1, int(budget) + 1), key=lambda n: (abs(pairs(n, extra, window) - budget), n))


def configurations(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every (method, w, value) of ``cfg.methods`` (``cfg.only`` picks methods): its label, samplerlab
    overrides, step count, the CFG pairs it should spend and the label of the CFG row it is compared with."""
    every = OmegaConf.to_container(cfg.methods, resolve=True)
    if cfg.only is not None and set(cfg.only) - set(every):
        raise ConfigError(f"only: no method {sorted(set(cfg.only) - set(every))}; choose from {', '.join(every)}")
    methods = {k: v for k, v in every.items() if cfg.only is None or k in set(cfg.only)}

    def matched(m: dict) -> int:
        return steps_for(cfg.budget_pairs, float(m.get("extra", 0.0)), tuple(m.get("window", (0.0, 1.0))))

    cfg_scales = [float(x) for x in every.get("cfg", {}).get("cfg_scale", [])]
    equal_steps = {matched(every[m["steps_as"]]): k for k, m in every.items() if m.get("steps_as")}
    out = []
    for name, m in methods.items():
        extra, window = float(m.get("extra", 0.0)), tuple(m.get("window", (0.0, 1.0)))
        equal = m.get("steps_as") is not None
        steps = matched(every[m["steps_as"]]) if equal else matched(m)
        for w in m.get("cfg_scale", [None]):
            for v in m.get("values", [None]):
                label = name + ("" if w is None else f" w={w:g}") + ("" if v is None else f" {short(m['param'])}={v:g}")
                if equal:
                    label += f" ({steps} steps)"
                over = [*m["run"], *([] if w is None else [f"cfg_scale={w}"]),
                        *([] if v is None else [f"{m['param']}={v}"])]
                ref_w = nearest(cfg_scales, m.get("ref", w))
                refs = [] if name == "cfg" else [f"cfg w={ref_w:g}"]  # matched NFE (cfg at the budget's steps)
                if equal_steps.get(steps) and not equal:  # and at equal steps, where the study has that row
                    refs.append(f"{equal_steps[steps]} w={ref_w:g} ({steps} steps)")
                out.append({"label": label, "method": name, "cfg_scale": w, "value": v, "overrides": over,
                            "steps": steps, "pairs": pairs(steps, extra, window), "equal_steps": equal, "refs": refs})
    return out


def nearest(scales: list[float], w: float | None) -> float | None:
    """The CFG scale of the comparison row: ``w`` when the cfg rows have it, else the nearest of theirs."""
    if w is None or not scales or w in scales:
        return w
    return min(scales, key=lambda x: (abs(x - w), x))


def short(param: str) -> str:
    """``guidance.pag.scale`` → ``pag.scale``; ``cfg_scale`` → ``λ`` (CFG++'s scale)."""
    return "λ" if param == "cfg_scale" else ".".join(param.split(".")[1:])


# --- measures --------------------------------------------------------------------------------------

def saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation (max − min)/max over the pixels of images [B, 3, H, W] in [0, 1] (0 for black)."""
    x = images.float().clamp(0, 1)
    hi, lo = x.max(1).values, x.min(1).values
    return float(torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi)).mean())


def contrast(images: torch.Tensor) -> float:
    """Mean over the images of the RMS contrast: the standard deviation of the luma (Rec. 601 weights)."""
    x = images.float().clamp(0, 1)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return float(luma.flatten(1).std(1, unbiased=False).mean())


def fd_to_reference(images: torch.Tensor, count: int, seed: int) -> float:
    """The fid plugin's FD (bundled CLIP features) of ``images`` to ``count`` world scenes from ``seed``
    (its reference features, cached as the plugin caches them)."""
    from framework.metrics.features import load_features
    from framework.metrics.reference import ReferenceSet, add_real_features, reference_features
    from plugins.metrics.fid import FID

    extractor = load_features("clip")
    real, _ = reference_features(extractor, "clip", ReferenceSet(count, seed))
    metric = FID(reference=count, reference_seed=seed).make_metric(extractor, len(images), len(real))
    add_real_features(metric, real)
    with torch.no_grad():
        metric.update(images.float().cpu(), real=False)
        return float(metric.compute())


def prompts_of(spec: dict, n: int, omit_rate: float):
    """The set's scenes: captions (the prompts) and images in [0, 1] (the real counterparts)."""
    from framework.bundled.world import sample_scenes

    scenes = sample_scenes(n, int(spec["scenes_seed"]), omit_rate=omit_rate)
    return scenes, (scenes.images + 1) / 2


def real_row(scenes, images: torch.Tensor, cfg: DictConfig) -> dict[str, float]:
    """The real scenes of a set's prompts, measured as the generated ones are."""
    from framework.bundled import load_judge
    from framework.bundled.world import label_indices
    from plugins.metrics.clip_score import load_scorer

    with torch.no_grad():
        pred = load_judge().predict(images * 2 - 1)
    truth = label_indices(scenes.labels)
    scorer = load_scorer(None)
    scorer.update((images * 255).round().to(torch.uint8), list(scenes.captions))
    return {"colour": float((pred["colour"] == truth["colour"]).float().mean()),
            "shape": float((pred["shape"] == truth["shape"]).float().mean()),
            "fd": fd_to_reference(images, cfg.fid_reference, cfg.fid_reference_seed),
            "clip_score": float(scorer.compute()), "saturation": saturation(images), "contrast": contrast(images)}


def measure(conf: dict, spec: dict, prompts: list[str], cfg: DictConfig, folder: Path) -> tuple[dict, torch.Tensor]:
    """One configuration on one set: its row and its images (reused from ``folder`` when the same)."""
    from safetensors.torch import load_file, save_file

    n = len(prompts)
    overrides = [f"model={cfg.model}", f"steps={conf['steps']}", f"num_samples={n}", f"batch_size={min(n, cfg.batch_size)}",
                 f"seed={spec['seed']}", "prompts=[" + ",".join(prompts) + "]", "save_images=false",
                 "metrics=[prompt_accuracy,fid,clip_score]", f"metrics.fid.reference={cfg.fid_reference}",
                 f"metrics.fid.reference_seed={cfg.fid_reference_seed}", *conf["overrides"]]
    tag = slug(conf["label"]) + f"_{spec['name']}"
    row_file, image_file = folder / "rows" / f"{tag}.json", folder / "rows" / f"{tag}.safetensors"
    if row_file.is_file() and image_file.is_file():
        row = json.loads(row_file.read_text())
        if row.get("overrides") == overrides:
            return row, load_file(image_file)["images"].float() / 255
    res = run(overrides, output_dir=folder / "runs" / tag)
    m, images = res.record["metrics"], res.images.float().clamp(0, 1)
    row = {"colour": m["prompt_accuracy_colour"], "shape": m["prompt_accuracy_shape"], "fd": m["fid"],
           "clip_score": m["clip_score"], "saturation": saturation(images), "contrast": contrast(images),
           "seconds_per_image": m["seconds_per_sample"], "steps": conf["steps"], "nfe": m["nfe"],
           "unet_calls": m["unet_calls"], "network_inputs": m["network_inputs"], "nfe_pairs": m["nfe_pairs"],
           "overrides": overrides}
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    save_file({"images": (images * 255).round().to(torch.uint8).contiguous()}, str(image_file))
    row_file.write_text(json.dumps(row, indent=1))
    return row, images


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label.replace("λ", "lambda"))


def study(cfg: DictConfig, folder: Path) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """Every configuration on both sets; returns the results and the grid's rows (set A's first prompts)."""
    torch.set_num_threads(1)  # the build machine's cores are shared
    confs = configurations(cfg)
    sets = {name: {"name": name, **OmegaConf.to_container(spec)} for name, spec in cfg.sets.items()}
    n, k = int(cfg.samples), int(cfg.grid_prompts)
    results: dict[str, Any] = {"model": cfg.model, "samples_per_set": n, "budget_pairs": cfg.budget_pairs, "sets": {},
                               "real": {}, "configurations": {}, "cannot_run": {}}
    rows_for_grid: list[tuple[str, torch.Tensor]] = []
    pooled: dict[str, list[torch.Tensor]] = {c["label"]: [] for c in confs}
    prompts = {}
    for s, spec in sets.items():
        scenes, real = prompts_of(spec, n, cfg.omit_rate)
        prompts[s] = list(scenes.captions)
        results["sets"][s] = {**{k2: v for k2, v in spec.items() if k2 != "name"}, "prompts": prompts[s]}
        results["real"][s] = real_row(scenes, real, cfg)
        if not rows_for_grid:
            rows_for_grid.append(("real scenes of the prompts", real[:k]))
    # configuration by configuration, both sets each: an interrupted study keeps whole rows
    for conf, (s, spec) in tqdm([(c, x) for c in confs for x in sets.items()], desc="configurations × sets"):
        if conf["label"] in results["cannot_run"]:
            continue
        try:
            row, images = measure(conf, spec, prompts[s], cfg, folder)
        except ConfigError as e:  # a method this model cannot run: say why, measure the others
            results["cannot_run"][conf["label"]] = str(e)
            continue
        entry = results["configurations"].setdefault(conf["label"], {
            **{x: conf[x] for x in ("method", "cfg_scale", "value", "steps", "pairs", "equal_steps", "refs")},
            "overrides": conf["overrides"], "sets": {}})
        entry["sets"][s] = {x: v for x, v in row.items() if x != "overrides"}
        pooled[conf["label"]].append(images)
        if s == next(iter(sets)):
            rows_for_grid.append((conf["label"], images[:k]))
    names = list(sets)
    results["real"]["fd_pooled"] = fd_to_reference(
        torch.cat([prompts_of(sets[s], n, cfg.omit_rate)[1] for s in names]), cfg.fid_reference, cfg.fid_reference_seed)
    for label, entry in results["configurations"].items():
        entry["fd_pooled"] = fd_to_reference(torch.cat(pooled[label]), cfg.fid_reference, cfg.fid_reference_seed)
    summarise(results, names)
    return results, rows_for_grid


# --- the summary -----------------------------------------------------------------------------------

def summarise(results: dict, names: list[str]) -> None:
    """Per configuration and figure: the mean over the sets and the difference between them (A − B).
    Two noise floors per figure: ``noise_floor``, the median |A − B| over the configurations (how far
    a figure moves between two sample sets: prompts and seeds), and ``effect_floor``, the median over
    the comparisons of |Δ_A − Δ_B| (how far two independent estimates of one effect, each at equal
    prompts and seeds, disagree). Per configuration its effects against its CFG rows (same w; matched
    NFE, and equal steps where the study has that row): better / worse when both sets' Δ exceed the
    effect floor in the same direction."""
    confs = results["configurations"]
    for label in results.get("cannot_run", {}):  # a set it ran before the error is not a comparison
        confs.pop(label, None)
    a, b = names[0], names[-1]
    for entry in confs.values():
        entry["mean"] = {f: statistics.fmean(entry["sets"][s][f] for s in names) for f in FIGURES}
        entry["diff"] = {f: entry["sets"][a][f] - entry["sets"][b][f] for f in FIGURES}
    results["noise_floor"] = {f: statistics.median(abs(e["diff"][f]) for e in confs.values()) for f in FIGURES}
    pairs_ = [(e, confs[r]) for e in confs.values() for r in e["refs"] if r in confs]
    delta = {f: [[e["sets"][s][f] - ref["sets"][s][f] for s in names] for e, ref in pairs_] for f in BETTER}
    floor = {f: statistics.median(abs(d[0] - d[-1]) for d in delta[f]) if delta[f] else 0.0 for f in BETTER}
    results["effect_floor"] = floor
    for entry in confs.values():
        entry["effects"] = {r: effect(entry, confs[r], names, floor) for r in entry["refs"] if r in confs}


def effect(entry: dict, ref: dict, names: list[str], floor: dict[str, float]) -> dict[str, dict]:
    """Per figure with a better direction: the difference to ``ref`` in each set, its mean, and the
    verdict (better / worse: both sets' differences exceed the floor in that direction; else within noise)."""
    out = {}
    for f, sign in BETTER.items():
        d = [entry["sets"][s][f] - ref["sets"][s][f] for s in names]
        better, worse = all(x * sign > floor[f] for x in d), all(x * sign < -floor[f] for x in d)
        out[f] = {"sets": d, "mean": statistics.fmean(d),
                  "verdict": "better" if better else "worse" if worse else "within noise"}
    return out


def cell(entry: dict, f: str, digits: int) -> str:
    return f"{entry['mean'][f]:.{digits}f} ({entry['diff'][f]:+.{digits}f})"


DIGITS = {"colour": 3, "shape": 3, "fd": 4, "clip_score": 2, "saturation": 3, "contrast": 3, "seconds_per_image": 2}


def table(results: dict) -> list[str]:
    """The markdown table: one row per configuration, each figure as mean over the sets (A − B)."""
    sets = list(results["sets"])
    lines = ["| configuration | steps | NFE pairs (inputs/step) | colour acc. | shape acc. | FD (CLIP) | FD pooled "
             "| CLIP score | saturation | contrast | s / image |", "| --- |" + " --- |" * 10]
    for s in sets:
        r = results["real"][s]
        lines.append(f"| *real scenes, set {s}* | — | — | {r['colour']:.3f} | {r['shape']:.3f} | {r['fd']:.4f} | "
                     f"{results['real']['fd_pooled']:.4f} | {r['clip_score']:.2f} | {r['saturation']:.3f} | "
                     f"{r['contrast']:.3f} | — |")
    for label, e in results["configurations"].items():
        first = e["sets"][sets[0]]
        per_step = first["network_inputs"] / first["steps"]
        lines.append(f"| {label} | {e['steps']} | {first['nfe_pairs']:g} ({per_step:g}) | "
                     + " | ".join(cell(e, f, DIGITS[f]) for f in ("colour", "shape", "fd"))
                     + f" | {e['fd_pooled']:.4f} | "
                     + " | ".join(cell(e, f, DIGITS[f]) for f in FIGURES[3:])
                     + " |")
    return lines


def effects(results: dict) -> list[str]:
    """The markdown table of effects against each configuration's CFG row, per set, with the verdict."""
    sets = list(results["sets"])
    lines = ["| configuration | compared with | " + " | ".join(f"Δ{f} ({'/'.join(sets)})" for f in BETTER) + " |",
             "| --- | --- |" + " --- |" * len(BETTER)]
    for label, e in results["configurations"].items():
        for ref_label, eff in e["effects"].items():
            cells = []
            for f in BETTER:
                x = eff[f]
                mark = {"better": " **better**", "worse": " *worse*", "within noise": ""}[x["verdict"]]
                cells.append("/".join(f"{d:+.{DIGITS[f]}f}" for d in x["sets"]) + mark)
            ref = results["configurations"][ref_label]
            lines.append(f"| {label} | {ref_label.split(' (')[0]} ({ref['steps']} steps) | " + " | ".join(cells) + " |")
    return lines


def write(results: dict, rows: list[tuple[str, torch.Tensor]], out: Path) -> list[str]:
    """``<out>/guidance/methods.md`` (the tables), ``methods.json`` and ``methods.png`` (the grid)."""
    files: list[str] = []
    folder, model = out / "guidance", results.get("model", "bundled")
    stem = file_stem("methods", model)
    floor, eff = results["noise_floor"], results["effect_floor"]
    n, sets = results["samples_per_set"], list(results["sets"])
    head = [f"`model={model}`, Euler on its default schedule, {n} prompts per set × {len(sets)} disjoint sets ({'/'.join(sets)}: "
            "captions of fresh world scenes and noise seeds both disjoint), matched budget "
            f"{results['budget_pairs']:g} CFG pairs (the record's nfe_pairs). Each cell: the mean over the sets "
            f"({sets[0]} − {sets[-1]}). Noise floor (median |{sets[0]} − {sets[-1]}| over the configurations): "
            + ", ".join(f"{f} {floor[f]:.{DIGITS[f]}f}" for f in FIGURES) + ". FD pooled: both sets together "
            f"({len(sets) * n} images). s / image: sampling with the metrics' per-batch work, one thread of a shared "
            "2-core machine.", ""]
    lines = head + table(results) + [
        "", "Effects against the CFG rows at the same w — matched NFE (the budget's steps) and, for the 1.5-pair "
        f"methods, equal steps — per set ({'/'.join(sets)}, each at equal prompts and seeds). Effect noise floor (median "
        f"|Δ{sets[0]} − Δ{sets[-1]}| over the comparisons): " + ", ".join(f"{f} {eff[f]:.{DIGITS[f]}f}" for f in BETTER)
        + "; **better** / *worse*: both sets' Δ beyond it in the same direction.", ""] + effects(results)
    if results.get("cannot_run"):
        root = str(Path.cwd().resolve()) + "/"  # the reasons name files: relative to the repository
        lines += ["", "Not run on this model:", ""] + [f"- {k}: {v.replace(root, '')}" for k, v in results["cannot_run"].items()]
    save_text("\n".join(lines) + "\n", folder / f"{stem}.md", files)
    save_text(json.dumps(results, indent=1), folder / f"{stem}.json", files)
    image_rows(rows, folder / f"{stem}.png", files, title=f"set {sets[0]}: the first {len(rows[0][1])} prompts, same seeds",
               tile=0.7)
    return files
