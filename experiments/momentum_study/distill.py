"""What ``solver=distill`` (score distillation) gives, measured against the ODE
sampler and real data: on ``model=mixture`` (exact density) and on the bundled model (FID, CLIP
score, saturation, diversity).

    python -m experiments.momentum_study.distill            # writes docs/momentum_distill_table.md
    python -m experiments.momentum_study.distill fast=true out=/tmp/x

Mixture columns: NLL = mean −log p(x) under the true mixture (lower = nearer a mode); spread =
mean ‖x − μ_k‖²/(dim·s_k²) to the most likely component (1 for data); TV = total variation
between the component occupancy and the mixture weights (0 for data). Bundled columns: FID and
CLIP score as in the study; clipped = fraction of decoded pixel values at 0 or 1; diversity =
mean pairwise distance of bundled-CLIP image features among samples of the same prompt, and
among all samples (real scenes: all pairs only; their captions are random).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from experiments.harness import Experiment, entry, save_text
from framework.entry.api import run
from framework.models.analytic import Mixture

HERE = Path(__file__).resolve().parent


def mixture_stats(model: Mixture, x: torch.Tensor) -> dict[str, float]:
    """NLL under the mixture, within-component spread (1 for data) and occupancy TV (0 for data)."""
    x = x.double().reshape(x.shape[0], -1)
    dim = x.shape[1]
    s2 = model.stds.double() ** 2
    sq = torch.cdist(x, model.means.double()) ** 2  # [n, K]
    logp = model.log_weights[None] - 0.5 * sq / s2[None] - 0.5 * dim * torch.log(2 * math.pi * s2)[None]
    k = logp.argmax(1)
    occupancy = torch.bincount(k, minlength=len(s2)).double() / len(k)
    return {"nll": float(-torch.logsumexp(logp, 1).mean()),
            "spread": float((sq.gather(1, k[:, None])[:, 0] / (dim * s2[k])).mean()),
            "tv": float(0.5 * (occupancy - model.log_weights.exp()).abs().sum())}


def diversity(images: torch.Tensor, prompts: list[str], features: torch.nn.Module) -> float:
    """Mean pairwise distance of bundled-CLIP image features among samples that share a prompt."""
    f = features(images.float())
    dists = []
    for p in sorted(set(prompts)):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) > 1:
            d = torch.pdist(f[idx])
            dists.append(d.mean())
    return float(torch.stack(dists).mean())


def main(argv: list[str] | None = None) -> dict:
    """Write the table (``<out>/momentum_distill_table.md``); returns the record (``<runs>/record.json``)."""
    ex = Experiment.compose(HERE, argv, config_name="distill")
    cfg = ex.cfg
    methods = OmegaConf.to_container(cfg.methods)
    torch.set_num_threads(int(cfg.threads))
    # fast: 8 images, two per default prompt (diversity among samples of one prompt needs a pair)
    n_mix, n_img, steps = (64, 8, 5) if cfg.fast else (cfg.mixture_samples, cfg.bundled_samples, cfg.steps)
    model = Mixture()
    lines = [f"**Mixture** (`model=mixture`, float64, {n_mix} samples, {steps} iterations/steps, karras grid; "
             "NFE = steps for every row)", "", "| method | NFE | NLL | spread | TV |", "| --- | --- | --- | --- | --- |"]
    data = model.sample_data(n_mix, torch.Generator().manual_seed(0))
    results: dict[str, dict] = {"mixture": {"true samples": mixture_stats(model, data)}, "bundled": {}}
    for name, extra in methods.items():
        res = run(["model=mixture", "dtype=float64", f"num_samples={n_mix}", f"batch_size={n_mix}", f"steps={steps}"] + extra)
        results["mixture"][name] = {"nfe": res.record["metrics"]["nfe"], **mixture_stats(model, res.latents)}
    for name, s in results["mixture"].items():
        nfe = f"{s['nfe']:.0f}" if "nfe" in s else "—"
        lines.append(f"| {name} | {nfe} | {s['nll']:.2f} | {s['spread']:.2f} | {s['tv']:.3f} |")

    from framework.bundled.world import sample_scenes
    from framework.metrics.clip_features import BundledCLIPFeatures
    from experiments.momentum_study.images import clipped_fraction, model_version

    features = BundledCLIPFeatures()
    mv = model_version()
    lines += ["", f"**Bundled model** (`{mv['title']}`, weights commit {mv['weights_commit']}, CFG {cfg.cfg_scale}, "
              f"{n_img} samples, {steps} steps/iterations; FID against 256 real scenes)", "",
              "| method | NFE | FID | CLIP score | clipped | diversity (same prompt) | diversity (all pairs) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    real = (sample_scenes(n_img, seed=7).images + 1) / 2
    lines.append(f"| real scenes (random captions) | — | — | — | {clipped_fraction(real):.3f} | — | "
                 f"{diversity(real, ['all'] * n_img, features):.3f} |")
    base = ["model=bundled", f"num_samples={n_img}", f"batch_size={n_img}", f"steps={steps}", f"cfg_scale={cfg.cfg_scale}",
            "callback=[]", "metrics=[fid,clip_score]", "save_images=false"]
    for name, extra in methods.items():
        res = run(base + extra)
        m = res.record["metrics"]
        prompts = [str(k % 4) for k in range(n_img)]  # the engine gives sample k the default prompt k mod 4
        row = results["bundled"][name] = {
            "nfe": m["nfe"], "fid": m["fid"], "clip_score": m["clip_score"], "clipped": clipped_fraction(res.images),
            "diversity_same_prompt": diversity(res.images, prompts, features),
            "diversity_all_pairs": diversity(res.images, ["all"] * n_img, features)}
        lines.append(f"| {name} | {row['nfe']:.0f} | {row['fid']:.3f} | {row['clip_score']:.2f} | {row['clipped']:.3f} | "
                     f"{row['diversity_same_prompt']:.3f} | {row['diversity_all_pairs']:.3f} |")
    text = "\n".join(lines) + "\n"
    files: list[str] = []
    save_text(text, Path(cfg.out) / "momentum_distill_table.md", files)
    print(text)
    return ex.record(Path(cfg.runs) / "record.json", results, files)


if __name__ == "__main__":
    entry(main)
