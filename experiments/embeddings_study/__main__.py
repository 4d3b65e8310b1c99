"""Text-embedding edits on a bundled model, measured by the bundled judge (docs/embeddings.md).

    python -m experiments.embeddings_study                   # writes docs/embeddings/{results.md,results.json,*.png}
    python -m experiments.embeddings_study model=bundled_flow   # … docs/embeddings/bundled_flow/
    python -m experiments.embeddings_study fast=true out=/tmp/x

Three studies, each made of ordinary samplerlab runs (framework.entry.api.run; the model's default
sampler: euler on the karras grid (VP) or on flow_match (the flow model), CFG 5, 20 steps) scored by the judge (framework.bundled.load_judge):

- **swap** — prompts "a red <shape>"; runs without and with ``conditioning=[token_swap]``
  (red → blue), and the prompts "a blue <shape>" for comparison: the judge's colour rates.
- **mix** — ``conditioning=[token_mix]``: red's embedding ← (1 − w)·e(red) + w·e(blue) for a
  range of w, and ``conditioning=[prompt_mix]`` ("a red …" / "a blue …" output embeddings) at
  0.5: judge rates and the mean red and blue channels of the object pixels (pixels farther than
  0.25 in RGB from the image's border median, i.e. the background) and of the whole image.
- **textual inversion** — trains ``<striped>`` with experiments.textual_inversion (or reads
  ``ti_embedding``), then generates "a <striped> <colour> <shape>" and "a <colour> <shape>": the
  judge's striped rate with the learned token, without it, and with the untrained initial vector.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.harness import Experiment, entry, save_grid, save_png, save_text
from framework.bundled.world import COLOURS, SHAPES
from framework.entry.api import run

HERE = Path(__file__).resolve().parent
TI_DIR = HERE.parent / "textual_inversion"


def ti_config(study: DictConfig, **over: Any) -> DictConfig:
    """experiments/textual_inversion's config with the study's ``ti`` overrides and ``over`` applied."""
    return OmegaConf.merge(Experiment.compose(TI_DIR, []).cfg, OmegaConf.to_container(study.ti), over)


class Study:
    def __init__(self, cfg: DictConfig, folder: Path):
        from framework.bundled import load_judge

        self.cfg, self.folder = cfg, folder
        self.judge = load_judge()
        self.per_prompt = 2 if cfg.fast else int(cfg.samples_per_prompt)
        self.steps = 4 if cfg.fast else int(cfg.steps)
        self.shapes = list(cfg.shapes)[:2] if cfg.fast else list(cfg.shapes)
        self.images: dict[str, torch.Tensor] = {}

    def generate(self, name: str, prompts: list[str], extra: list[str] = ()) -> dict[str, Any]:
        """One run (every prompt × samples_per_prompt seeds): images, judge rates, colour statistics."""
        n = len(prompts) * self.per_prompt
        quoted = ",".join(f"'{p}'" for p in prompts)
        over = [f"model={self.cfg.model}", f"prompts=[{quoted}]", f"num_samples={n}", f"batch_size={min(n, 32)}", f"steps={self.steps}",
                f"seed={self.cfg.seed}", "save_images=false", *extra]
        t0 = time.perf_counter()
        res = run(over, output_dir=self.folder / "runs" / name)
        images = res.images
        self.images[name] = images
        pred = self.judge.predict(images * 2 - 1)
        colours = [COLOURS[i] for i in pred["colour"].tolist()]
        obj_r, obj_b = object_means(images)
        asked = [named(prompts[k % len(prompts)]) for k in range(n)]  # sample k's prompt (the engine's rule)
        judged = list(zip(colours, [SHAPES[i] for i in pred["shape"].tolist()]))
        return {
            "asked": {part: None if any(a[i] is None for a in asked) else
                      sum(j[i] == a[i] for j, a in zip(judged, asked)) / n for i, part in enumerate(("colour", "shape"))},
            "n": n, "seconds": time.perf_counter() - t0,
            "rate": {c: colours.count(c) / n for c in ("red", "blue", "purple")},
            "striped": float(pred["striped"].float().mean()),
            "image_mean_R": float(images[:, 0].mean()), "image_mean_B": float(images[:, 2].mean()),
            "object_mean_R": obj_r, "object_mean_B": obj_b,
        }

    def swap(self) -> dict[str, Any]:
        red = [f"a red {s}" for s in self.shapes]
        blue = [f"a blue {s}" for s in self.shapes]
        swap = ["conditioning=[token_swap]", "conditioning.token_swap.source=red", "conditioning.token_swap.target=blue"]
        return {"prompt red": self.generate("swap_plain", red), "prompt red, swap red→blue": self.generate("swap_swapped", red, swap),
                "prompt blue": self.generate("swap_blue", blue)}

    def mix(self) -> dict[str, Any]:
        red = [f"a red {s}" for s in self.shapes]
        out = {}
        for w in ([0.0, 0.5, 1.0] if self.cfg.fast else list(self.cfg.mix_weights)):
            over = ["conditioning=[token_mix]", "conditioning.token_mix.token=red", "conditioning.token_mix.tokens=[red,blue]",
                    f"conditioning.token_mix.weights=[{1 - w},{w}]"]
            out[f"token_mix w_blue={w}"] = self.generate(f"mix_{w}", red, over)
        for w in [0.5]:
            over = ["conditioning=[prompt_mix]", f"conditioning.prompt_mix.weight={w}"]
            # one second prompt per shape: run each shape separately and pool
            parts = [self.generate(f"prompt_mix_{s}", [f"a red {s}"], over + [f"conditioning.prompt_mix.prompt='a blue {s}'"])
                     for s in self.shapes]
            out[f"prompt_mix w_blue={w}"] = pool(parts)
            self.images[f"prompt_mix_{w}"] = torch.cat([self.images.pop(f"prompt_mix_{s}") for s in self.shapes])
        return out

    def _train(self, name: str, **over: Any) -> tuple[Path, dict[str, Any]]:
        """Train a token with experiments.textual_inversion (config + ``ti`` overrides + ``over``);
        its record goes to ``<runs>/<name>/train.json``."""
        from experiments.textual_inversion.__main__ import run as train

        cfg = ti_config(self.cfg, fast=bool(self.cfg.fast), out=str(self.folder / name), model=str(self.cfg.model), **over)
        summary = train(Experiment("textual_inversion", cfg))["results"]
        return Path(summary["file"]), summary

    def textual_inversion(self) -> dict[str, Any]:
        """The striped concept: judge rates, the VAE's ceiling, held-out denoising loss."""
        from experiments.bundled_model.vae import reconstruct
        from experiments.textual_inversion.__main__ import denoising_loss, load_pipe, striped_scenes, with_token
        from framework.bases.embeddings import LearnedTokens, TextEmbeddings, load_embeddings, save_embeddings

        ti = ti_config(self.cfg)
        token = str(ti.placeholder_token)
        if self.cfg.ti_embedding:
            path = Path(self.cfg.ti_embedding)
            log = path.parent / "train.json"  # the record experiments.textual_inversion writes beside the file
            summary = json.loads(log.read_text())["results"] if log.exists() else {"file": str(path)}
        else:
            path, summary = self._train("ti_striped")
        pipe = load_pipe(str(self.cfg.model))
        emb = TextEmbeddings.of(pipe)
        init = emb.vector(str(ti.initializer_token)).detach()[None].repeat(int(ti.num_vectors), 1)
        init_path = save_embeddings(self.folder / "ti_initial.safetensors", {token: init})
        colours = ["red", "green", "blue", "yellow"]
        plain = [f"a {c} {s}" for c in colours for s in self.shapes]
        place = str(ti.get("token_place", "colour"))
        prompts = [with_token(c, s, token, place) for c in colours for s in self.shapes]
        use = ["conditioning=[textual_inversion]", f"conditioning.textual_inversion.path='{path}'"]
        use0 = ["conditioning=[textual_inversion]", f"conditioning.textual_inversion.path='{init_path}'"]
        results: dict[str, Any] = {
            "without token": self.generate("ti_plain", plain),
            "with learned token": self.generate("ti_learned", prompts, use),
            "with untrained token (initializer vector)": self.generate("ti_initial", prompts, use0),
        }
        # what the model can show at all: the judge on real striped scenes and on their VAE round trip
        n = 8 if self.cfg.fast else 64
        images, captions = striped_scenes(n, 20_000 + int(self.cfg.seed), token, place)
        rec = reconstruct(pipe.vae, images).clamp(-1, 1)
        learned = load_embeddings(path, token=token)
        no_token = [re.sub(rf"\s*{re.escape(token)}", "", c) for c in captions]
        results["ceiling"] = {
            "n": n,
            "judge striped, real scenes": float(self.judge.predict(images)["striped"].float().mean()),
            "judge striped, VAE reconstructions": float(self.judge.predict(rec)["striped"].float().mean()),
            "held-out loss, captions without token": denoising_loss(pipe, no_token, images),
            "held-out loss, learned token": denoising_loss(pipe, captions, images, [LearnedTokens(learned)]),
            "held-out loss, untrained token": denoising_loss(pipe, captions, images, [LearnedTokens({token: init})]),
        }
        results["training"] = {k: summary.get(k) for k in TRAINING_KEYS}
        return results

    def ti_colour(self) -> dict[str, Any]:
        """A concept the model can render: a colour learned from an image folder with its word removed."""
        from framework.bundled.world import sample_scenes

        colour, token = str(self.cfg.colour_concept), "<my-colour>"
        pool_ = sample_scenes(400, 30_000 + int(self.cfg.seed), two_shape_rate=0.0, omit_rate=0.3)
        keep = [i for i, lab in enumerate(pool_.labels) if lab.main.colour == colour][: (4 if self.cfg.fast else 16)]
        folder = self.folder / "colour_images"
        for i in keep:
            save_png((pool_.images[i] + 1) / 2, folder / f"{i}.png")
            save_text(pool_.captions[i].replace(colour, "{token}", 1), folder / f"{i}.txt")
        path, summary = self._train("ti_colour", images=str(folder), placeholder_token=token)
        use = ["conditioning=[textual_inversion]", f"conditioning.textual_inversion.path='{path}'"]
        results = {
            "prompt 'a <shape>'": self.generate("colour_plain", [f"a {s}" for s in self.shapes]),
            f"prompt 'a {token} <shape>'": self.generate("colour_learned", [f"a {token} {s}" for s in self.shapes], use),
            f"prompt 'a {colour} <shape>'": self.generate("colour_word", [f"a {colour} {s}" for s in self.shapes]),
        }
        results["training"] = {k: summary.get(k) for k in TRAINING_KEYS}
        return results


TRAINING_KEYS = ("steps", "seconds", "num_images", "batch_size", "lr", "threads", "loss_first_20", "loss_last_20",
                 "initializer_token", "num_vectors")


def object_means(images: torch.Tensor, threshold: float = 0.25) -> tuple[float, float]:
    """Mean R and B over the object pixels of all images: pixels farther than ``threshold`` (RGB
    distance) from the median colour of the image's 2-pixel border (the background)."""
    border = torch.cat([images[:, :, :2].flatten(2), images[:, :, -2:].flatten(2),
                        images[:, :, :, :2].flatten(2), images[:, :, :, -2:].flatten(2)], dim=2)
    bg = border.median(dim=2).values[:, :, None, None]
    mask = (images - bg).norm(dim=1) > threshold
    if not mask.any():
        return float("nan"), float("nan")
    return float(images[:, 0][mask].mean()), float(images[:, 2][mask].mean())


def named(prompt: str) -> tuple[str | None, str | None]:
    """The colour and the shape a prompt asks for (its first world colour and shape words; None: none)."""
    words = prompt.replace(",", " ").split()
    return (next((w for w in words if w in COLOURS), None), next((w for w in words if w in SHAPES), None))


def pool(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sample-weighted means of several runs' statistics."""
    n = sum(p["n"] for p in parts)
    out: dict[str, Any] = {"n": n, "seconds": sum(p["seconds"] for p in parts)}
    for k in ("striped", "image_mean_R", "image_mean_B", "object_mean_R", "object_mean_B"):
        out[k] = sum(p[k] * p["n"] for p in parts) / n
    out["rate"] = {c: sum(p["rate"][c] * p["n"] for p in parts) / n for c in parts[0]["rate"]}
    out["asked"] = {k: None if any(p.get("asked", {}).get(k) is None for p in parts) else
                    sum(p["asked"][k] * p["n"] for p in parts) / n for k in ("colour", "shape")}
    return out


def as_asked(row: dict[str, Any]) -> str:
    """'97% / 91%' from a row's judge accuracies against the prompts (— where not measured)."""
    asked = row.get("asked") or {}
    return " / ".join("—" if asked.get(k) is None else f"{asked[k]:.0%}" for k in ("colour", "shape"))


def write(results: dict[str, Any], images: dict[str, torch.Tensor], cfg: DictConfig, out: Path) -> list[str]:
    """``results.json`` (merged into the one there: studies run separately add to it), the figures
    and ``results.md``; returns the names of the files written."""
    files: list[str] = []
    previous = out / "results.json"
    if previous.exists():
        results = {**json.loads(previous.read_text()), **results}
    save_text(json.dumps(results, indent=1), out / "results.json", files)
    cols = min(16, min(len(v) for v in images.values()))

    def figure(names: list[str], file: str) -> None:
        present = [images[n][:cols] for n in names if n in images]
        if present:
            save_grid(torch.cat(present), out / file, nrow=cols, scale=2, files=files)

    figure(["swap_plain", "swap_swapped", "swap_blue"], "swap.png")
    figure([k for k in images if k.startswith("mix_")] + ["prompt_mix_0.5"], "mix.png")
    figure(["ti_plain", "ti_learned", "ti_initial"], "textual_inversion.png")
    figure(["colour_plain", "colour_learned", "colour_word"], "ti_colour.png")

    model = results["settings"].get("model", "bundled")
    lines = [f"`model={model}`, Euler on its default schedule, `steps={results['settings']['steps']} cfg_scale=5`, seed "
             f"{cfg.seed}; every prompt × {results['settings']['samples_per_prompt']} samples; n = images per row. "
             "Rates: the judge's colour head (red / blue / purple) and striped head; as asked: the judge's colour and "
             "shape equal to the prompt's colour and shape words (— where a prompt names none).", ""]
    for study, rows in results.items():
        if study == "settings":
            continue
        lines += [f"### {study}", "", "| run | n | red | blue | purple | striped | colour / shape as asked | object R | object B | image R | image B |",
                  "| --- |" + " --- |" * 10]
        for name, r in rows.items():
            if name in ("training", "ceiling"):
                continue
            lines.append(f"| {name} | {r['n']} | {r['rate']['red']:.0%} | {r['rate']['blue']:.0%} | {r['rate']['purple']:.0%} | "
                         f"{r['striped']:.0%} | {as_asked(r)} | {r['object_mean_R']:.3f} | {r['object_mean_B']:.3f} | "
                         f"{r['image_mean_R']:.3f} | {r['image_mean_B']:.3f} |")
        if "ceiling" in rows:
            c = rows["ceiling"]
            lines += ["", f"On {c['n']} fresh striped scenes: the judge finds stripes in "
                          f"{c['judge striped, real scenes']:.0%} of the scenes and in {c['judge striped, VAE reconstructions']:.0%} "
                          f"of their VAE reconstructions (decode(encode(x))). Held-out denoising loss (4 noise draws per "
                          f"image): captions without the token {c['held-out loss, captions without token']:.5f}, with the "
                          f"learned token {c['held-out loss, learned token']:.5f}, with the untrained token "
                          f"{c['held-out loss, untrained token']:.5f}."]
        if "training" in rows:
            t = rows["training"]
            took = f"{t['seconds']:.0f} s" if t.get("seconds") is not None else "time not measured (given file)"
            lines += ["", f"Training: {t['steps']} steps × batch {t['batch_size']} on {t['num_images']} images, lr {t['lr']}, "
                          f"initializer '{t['initializer_token']}', {t.get('num_vectors') or 1} vector(s), {t['threads']} CPU thread(s): {took}; "
                          f"loss {t['loss_first_20']:.4f} (mean of the first 20 steps) → {t['loss_last_20']:.4f} (last 20)."]
        lines.append("")
    save_text("\n".join(lines), out / "results.md", files)
    return files


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the studies of ``studies``; returns the record, also written to ``<runs>/record.json``."""
    ex = Experiment.compose(HERE, argv)
    cfg, folder = ex.cfg, Path(ex.cfg.runs)
    torch.set_num_threads(int(cfg.threads))
    study = Study(cfg, folder)
    results: dict[str, Any] = {"settings": {"model": str(cfg.model), "steps": study.steps, "samples_per_prompt": study.per_prompt, "shapes": study.shapes}}
    for name in cfg.studies:
        t0 = time.perf_counter()
        results[name] = getattr(study, name)()
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
    out = Path(cfg.out) if cfg.model == "bundled" else Path(cfg.out) / str(cfg.model)  # each model its own folder
    files = write(results, study.images, cfg, out)
    print((out / "results.md").read_text())
    return ex.record(folder / "record.json", results, files)


if __name__ == "__main__":
    entry(main)
