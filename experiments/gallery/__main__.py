"""The deep dive's gallery: samplers, guidance and text embeddings side by side at equal seeds.

    python -m experiments.gallery                   # docs/deep_dive/gallery_<section>.png, gallery.json
    python -m experiments.gallery fast=true out=/tmp/dd
    python -m experiments.gallery 'only=[guidance]' model=sd15 'prompts=[a photo of a cat]' out=/tmp/sd

``sections`` (config.yaml) maps a section name to its rows; a row is a list of samplerlab overrides,
one ordinary run whose samples (same seeds, same prompts in every row unless the row changes them)
fill one row of the section's figure, labelled with its overrides and NFE. A row the model cannot
run (a configuration error, e.g. a token edit of a word that is several tokens for its tokenizer)
is shown as its error message, recorded, and warned about; the other rows still run.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from experiments.harness import Experiment, entry, load_model, pyplot, save_figure, show
from framework.entry.api import run as sample
from framework.plugin import ConfigError

HERE = Path(__file__).resolve().parent


def section_figure(name: str, rows: list[dict], path: Path, files: list[str]) -> None:
    plt = pyplot()
    n = max([r["images"].shape[0] for r in rows if "images" in r] or [1])
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 3.4, 1.35 * len(rows) + 0.5), squeeze=False)
    for i, row in enumerate(rows):
        if "error" in row:  # a row this model cannot run: say why in its place
            for ax in axes[i]:
                ax.axis("off")
            axes[i, 0].text(0, 0.5, f"{' '.join(row['overrides'])}:\n{row['error']}", fontsize=6, va="center", wrap=True)
            continue
        for j in range(n):
            if j < row["images"].shape[0]:
                top = i == 0 and not row["own_prompts"]  # rows that set their own prompts name them in their label
                show(axes[i, j], row["images"][j], f"“{row['prompts'][j % len(row['prompts'])]}”" if top else None)
            else:
                axes[i, j].axis("off")
        label = "\n".join(row["overrides"]) or "(defaults)"
        axes[i, 0].set_ylabel(f"{label}\nNFE {row['nfe']:g}", fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.title.set_fontsize(5)
    fig.suptitle(f"{name} (same seeds in every row)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)


def embeddings_figure(model, prompts: list[str], path: Path, files: list[str]) -> dict:
    """What the UNet attends to: the text encoder's output [77, D] for the first prompt (its tokens
    and two paddings), and the cosine similarity of the whole [77, D] outputs of the prompts and of
    the first prompt with ``red`` swapped for ``blue`` at the encoder's input (token_swap)."""
    from framework.bases.embeddings import TextEmbeddings
    from plugins.conditioning.token_swap import TokenSwap

    plt = pyplot()
    emb = getattr(model, "text_l", None) or TextEmbeddings.of(model)  # a family's first CLIP (its states, not pooled)
    with torch.no_grad():
        hidden = emb.encode(prompts).float().cpu()
        labels = list(prompts)
        if "red" in prompts[0].split():
            try:
                swapped = emb.encode(prompts[:1], [TokenSwap(source="red", target="blue")]).float().cpu()
            except ConfigError as e:  # 'red' is not one token for this tokenizer
                warnings.warn(f"gallery: no token-swap row in the embedding figure: {e}", stacklevel=1)
            else:
                hidden = torch.cat([hidden, swapped])
                labels.append(f"{prompts[0]} [token_swap red→blue]")
    if hidden.ndim != 3:  # an encoder that returns pooled vectors only: no per-token map
        warnings.warn(f"gallery: the text encoder's output is {tuple(hidden.shape)}, not per token: no embedding figure",
                      stacklevel=1)
        return {"skipped": f"encoder output {tuple(hidden.shape)} is not per token"}
    tokens = [t for _, t in emb.tokens(prompts[0])]
    n = len(tokens) + 2
    flat = torch.nn.functional.normalize(hidden.flatten(1), dim=1)
    sim = flat @ flat.T
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    lim = float(hidden[0, :n].abs().max())
    axes[0].imshow(hidden[0, :n].numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[0].set_yticks(range(n), tokens + ["(pad)", "(pad)"], fontsize=7)
    axes[0].set_xlabel(f"channel (of {hidden.shape[-1]})", fontsize=8)
    axes[0].set_title(f"encoder output for “{prompts[0]}”: {tuple(hidden.shape[1:])}, one row per position", fontsize=8)
    axes[1].imshow(sim.numpy(), cmap="viridis", vmin=float(sim.min()), vmax=1.0)
    for i in range(len(labels)):
        for j in range(len(labels)):
            axes[1].text(j, i, f"{sim[i, j]:.3f}", ha="center", va="center", fontsize=6, color="white" if sim[i, j] < 0.99 else "black")
    axes[1].set_yticks(range(len(labels)), labels, fontsize=6)
    axes[1].set_xticks(range(len(labels)), [str(i) for i in range(len(labels))], fontsize=6)
    axes[1].set_title("cosine similarity of the whole outputs", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, files)
    return {"tokens": tokens, "labels": labels, "cosine_similarity": sim.tolist()}


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment with Hydra-style overrides; returns its record (also written to ``out``)."""
    ex = Experiment.compose(HERE, argv, passthrough=True)
    cfg = ex.cfg
    sections = OmegaConf.to_container(cfg.sections)
    if not isinstance(sections, dict) or not all(isinstance(v, list) and all(isinstance(r, list) for r in v) for v in sections.values()):
        raise ConfigError("gallery.sections must map a name to a list of override lists, e.g. 'sections.x=[[solver=heun],[solver=euler]]'")
    if cfg.only is not None:
        unknown = sorted(set(cfg.only) - set(sections))
        if unknown:
            raise ConfigError(f"unknown gallery section(s) {', '.join(unknown)}: choose from {', '.join(sections)}")
        sections = {k: v for k, v in sections.items() if k in cfg.only}
    base = ex.run_overrides()
    out, folder = Path(cfg.out), Path(cfg.runs)
    files: list[str] = []
    results: dict[str, list[dict]] = {}
    for name, rows in sections.items():
        done = []
        for i, overrides in enumerate(rows[: cfg.fast_rows] if cfg.fast else rows):
            overrides = [str(o) for o in overrides]
            t = time.perf_counter()
            try:
                res = sample(base + overrides, output_dir=folder / name / f"{i:02d}")
            except ConfigError as e:  # e.g. a token edit whose word is several tokens for this model
                warnings.warn(f"gallery {name} row {i} ({' '.join(overrides)}) cannot run: {e}", stacklevel=1)
                done.append({"overrides": overrides, "error": str(e)})
                continue
            rec = res.record
            done.append({"overrides": overrides, "images": res.images.cpu(), "prompts": rec["config"]["prompts"],
                         "own_prompts": any(o.startswith("prompts=") for o in overrides), "nfe": rec["metrics"]["nfe"],
                         "seconds": time.perf_counter() - t, "run_key": rec["run_key"]})
        section_figure(name, done, out / f"gallery_{name}.png", files)
        results[name] = [{k: v for k, v in row.items() if k != "images"} for row in done]
    if cfg.embedding_prompts:
        model = load_model(base)
        if not hasattr(model, "text_encoder"):
            raise ConfigError("gallery's embedding figure needs a text-conditioned model; set embedding_prompts=[] to skip it")
        results["text_embeddings"] = embeddings_figure(model, list(cfg.embedding_prompts), out / "gallery_text_embeddings.png", files)
    return ex.record(out / "gallery.json", results, files)


if __name__ == "__main__":
    entry(main)
