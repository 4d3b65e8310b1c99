"""Guidance on a bundled model at equal seeds: what each loss guidance does to its loss, to the
judge's prompt accuracy and to the cost (NFE); img2img closeness; inpainting's known region.

    python -m experiments.guidance_study                 # writes docs/guidance/ (table, grids)
    python -m experiments.guidance_study model=bundled_flow   # docs/guidance/{grid,table,results}_bundled_flow.*
    python -m experiments.guidance_study fast=true out=/tmp/x
    python -m experiments.guidance_study --config-name defaults   # the loss plugins' defaults (defaults.py)
    python -m experiments.guidance_study --config-name inpaint    # inpainting's seams (seams.py)
    python -m experiments.guidance_study --config-name raw        # why the deep dive's raw update breaks (raw.py)
    python -m experiments.guidance_study --config-name methods    # the CFG family and perturbation guidance (methods.py)

Every configuration is an ordinary samplerlab run (framework.entry.api.run) with the same prompts and
seeds. Each loss is also evaluated on the baseline's images (the plugin's own ``loss``, as the record's
``guidance_loss_<name>`` is on guided ones); the CLIP score of clip_text's text is 100·(1 − loss).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from experiments.guidance_study import defaults, methods, seams
from experiments.guidance_study import raw as raw_update
from experiments.guidance_study.figures import file_stem, image_rows
from experiments.guidance_study.inputs import make_files
from experiments.harness import Experiment, entry, load_model, save_text
from framework.entry.api import run

HERE = Path(__file__).resolve().parent


def raw(name: str, scale: float) -> list[str]:
    """Overrides for the deep dive's unnormalised update x ← x − scale·σ²·∇ₓloss every 5 steps, all σ."""
    return [f"guidance.{name}.normalize=false", f"guidance.{name}.scale={scale}", f"guidance.{name}.every=5",
            f"guidance.{name}.sigma_hi=null"]


def default_of(cls) -> str:
    """A loss plugin's default step, e.g. ``0.5·σ, every 2, σ ≤ 5`` (read from the plugin, so the labels follow it)."""
    p = cls()
    return f"{p.scale:g}·σ, every {p.every}" + ("" if p.sigma_hi is None else f", σ ≤ {p.sigma_hi:g}")


def configs(files: Path, text: str) -> dict[str, list[str]]:
    from plugins.guidance.clip_text import CLIPText
    from plugins.guidance.color_loss import ColorLoss
    from plugins.guidance.image_match import ImageMatch
    from plugins.guidance.palette import Palette
    from plugins.guidance.style import Style

    ref, style, src, mask = (files / n for n in ("reference.png", "style.png", "source.png", "mask.png"))
    return {
        "cfg (baseline)": ["guidance=[cfg]"],
        # raw: the deep dive's x ← x − scale·σ²·∇ every 5 steps (normalize=false); the plugins' defaults are normalised
        f"color_loss blue, default ({default_of(ColorLoss)})": ["guidance=[cfg,color_loss]"],
        "color_loss blue, raw scale 2": ["guidance=[cfg,color_loss]", *raw("color_loss", 2)],
        "color_loss blue, raw scale 20": ["guidance=[cfg,color_loss]", *raw("color_loss", 20)],
        "color_loss blue, raw scale 200 (deep dive)": ["guidance=[cfg,color_loss]", *raw("color_loss", 200)],
        "color_loss blue, 0.2·σ, every 5 (the former default)": [
            "guidance=[cfg,color_loss]", "guidance.color_loss.scale=0.2", "guidance.color_loss.every=5",
            "guidance.color_loss.sigma_hi=null"],
        "color_loss blue, default, gradient=unet": ["guidance=[cfg,color_loss]", "guidance.color_loss.gradient=unet"],
        "color_loss blue, default, recurrence=1": ["guidance=[cfg,color_loss]", "guidance.color_loss.recurrence=1"],
        "color_loss blue, x0-space, raw scale 500": ["guidance=[cfg,color_loss]", "guidance.color_loss.space=x0",
                                                     *raw("color_loss", 500)],
        f"clip_text, default ({default_of(lambda: CLIPText(text='x'))})": ["guidance=[cfg,clip_text]", f"guidance.clip_text.text={text}"],
        f"image_match mse, default ({default_of(ImageMatch)})": ["guidance=[cfg,image_match]", f"guidance.image_match.image={ref}"],
        f"style, default ({default_of(Style)})": ["guidance=[cfg,style]", f"guidance.style.image={style}"],
        f"palette [blue,white], default ({default_of(Palette)})": ["guidance=[cfg,palette]"],
        "img2img strength 0.3": ["guidance=[cfg,img2img]", f"guidance.img2img.image={src}", "guidance.img2img.strength=0.3"],
        "img2img strength 0.6": ["guidance=[cfg,img2img]", f"guidance.img2img.image={src}", "guidance.img2img.strength=0.6"],
        "inpaint (right half new)": ["guidance=[cfg,inpaint]", f"guidance.inpaint.image={src}", f"guidance.inpaint.mask={mask}"],
    }


def baseline_losses(model, images: torch.Tensor, files: Path, text: str) -> dict[str, float]:
    """Every loss plugin's mean loss on (unguided) images, as the record reports it for guided runs."""
    from types import SimpleNamespace

    from plugins.guidance.clip_text import CLIPText
    from plugins.guidance.color_loss import ColorLoss
    from plugins.guidance.image_match import ImageMatch
    from plugins.guidance.palette import Palette
    from plugins.guidance.style import Style

    fake = SimpleNamespace(model=model, device=torch.device("cpu"), dtype=torch.float32)
    plugins = {"color_loss": ColorLoss(), "clip_text": CLIPText(text=text), "palette": Palette(),
               "image_match": ImageMatch(image=str(files / "reference.png")), "style": Style(image=str(files / "style.png"))}
    out = {}
    with torch.no_grad():
        for name, p in plugins.items():
            out[f"guidance_loss_{name}"] = float(p.loss(images.float(), p.setup(fake)).mean())
    return out


def vae_roundtrip_error(model, image: torch.Tensor, region: torch.Tensor) -> float:
    """Mean |decode(encode(image)) − image| over ``region``: the floor of any latent-space method."""
    with torch.no_grad():
        back = model.decode(model.encode_images(image[None]))[0]
    return float((back - image).abs()[..., region].mean())


def judge_colour_rate(images: torch.Tensor, colour: str) -> float:
    """Fraction of images whose main object the bundled judge calls ``colour``."""
    from framework.bundled import load_judge
    from framework.bundled.world import COLOURS

    pred = load_judge().predict(images.float().cpu() * 2 - 1)["colour"]
    return float((pred == COLOURS.index(colour)).float().mean())


def study(cfg: DictConfig, folder: Path, out: Path) -> tuple[dict, dict]:
    torch.set_num_threads(1)  # the build machine's cores are shared
    n = 4 if cfg.fast else cfg.num_samples
    steps = 4 if cfg.fast else cfg.steps
    pics = make_files(out / "guidance")
    model = load_model([f"model={cfg.model}"])  # the losses and the VAE round trip on the baseline's images
    base = [f"model={cfg.model}", f"steps={steps}", f"num_samples={n}", f"batch_size={n}", "seed=0",
            f"prompts=[{','.join(cfg.prompts)}]", "metrics=[prompt_accuracy]", "save_images=false"]
    todo = configs(out / "guidance", cfg.clip_text)
    if cfg.fast:
        todo = {k: todo[k] for k in list(todo)[:2] + ["img2img strength 0.3", "inpaint (right half new)"]}
    text_colour = next((w for w in cfg.clip_text.split() if w in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")), None)
    table, images = {}, {}
    for name, extra in tqdm(list(todo.items()), desc="configurations"):
        res = run(base + extra, output_dir=folder / "runs" / name.replace(" ", "_").replace(",", ""))
        m = res.record["metrics"]
        img = res.images
        row = {k: m[k] for k in ("nfe", "unet_calls", "seconds") if k in m}
        row["accuracy_colour"] = m.get("prompt_accuracy_colour")
        row["accuracy_shape"] = m.get("prompt_accuracy_shape")
        row["mean_blue"] = float(img[:, 2].mean())
        row.update({k: v for k, v in m.items() if k.startswith("guidance_loss_")})
        if "clip_text" in name and text_colour:
            row[f"judge_says_{text_colour}"] = judge_colour_rate(img, text_colour)
        if name.startswith("img2img") or name == "cfg (baseline)":
            row["mean_abs_to_source"] = float((img - pics["source.png"]).abs().mean())
        if name.startswith("inpaint"):
            keep = pics["mask.png"][0] < 0.5
            row["known_region_mean_abs"] = float((img - pics["source.png"]).abs()[..., keep].mean())
            row["new_region_mean_abs"] = float((img - pics["source.png"]).abs()[..., ~keep].mean())
            row["vae_floor_known_mean_abs"] = vae_roundtrip_error(model, pics["source.png"], keep)
        if name == "cfg (baseline)":
            row.update(baseline_losses(model, img, out / "guidance", cfg.clip_text))
        table[name] = row
        images[name] = img[:8]
    return table, images


def write(table: dict, images: dict, cfg: DictConfig, out: Path) -> list[str]:
    """``<out>/guidance/``: the grid of images, the table (markdown) and the results (JSON);
    returns the names of the files written."""
    folder, files = out / "guidance", []
    image_rows(list(images.items()), folder / f"{file_stem('grid', cfg.model)}.png", files)
    cols = sorted({k for row in table.values() for k in row if k != "seconds"}, key=lambda k: (k not in ("nfe", "unet_calls"), k))
    lines = ["| configuration | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, row in table.items():
        cells = [("" if row.get(c) is None else f"{row[c]:.4g}") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    save_text("\n".join(lines) + "\n", folder / f"{file_stem('table', cfg.model)}.md", files)
    save_text(json.dumps(table, indent=1), folder / f"{file_stem('results', cfg.model)}.json", files)
    return files


def main(argv: list[str] | None = None) -> dict:
    """Run the study (``--config-name defaults``: the loss plugins' defaults, measured;
    ``--config-name inpaint``: inpainting's seams; ``--config-name raw``: the deep dive's raw update);
    returns its record, also written to ``<runs>/record.json``."""
    ex = Experiment.compose(HERE, argv)
    cfg, folder, out = ex.cfg, Path(ex.cfg.runs), Path(ex.cfg.out)
    if ex.config_name == "defaults":  # from_results: the choice, tables and figure again, without the sweep
        results = json.loads(Path(cfg.from_results).read_text()) if cfg.from_results else defaults.sweep(cfg, folder, out)
        defaults.decide(results, cfg)
        return ex.record(folder / "record.json", results, defaults.write(results, cfg, folder, out))
    if ex.config_name == "raw":
        results, strips = raw_update.study(cfg, folder, out)
        return ex.record(folder / "record.json", results, raw_update.write(results, strips, cfg, out))
    if ex.config_name == "methods":
        results, rows = methods.study(cfg, folder)
        return ex.record(folder / "record.json", results, methods.write(results, rows, out))
    if ex.config_name == "inpaint":
        results, rows = seams.study(cfg, folder, out)
        return ex.record(folder / "record.json", results, seams.write(results, rows, out))
    table, images = study(cfg, folder, out)
    files = write(table, images, cfg, out)
    print(json.dumps(table, indent=1))
    return ex.record(folder / "record.json", table, files)


if __name__ == "__main__":
    entry(main)
