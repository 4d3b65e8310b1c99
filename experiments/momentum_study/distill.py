"""What ``solver=optimize solver.mode=distill`` (score distillation) gives, measured against the ODE
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
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from framework.entry.api import run
from framework.models.analytic import Mixture

DEFAULTS = {"fast": False, "out": "docs", "steps": 20, "mixture_samples": 1024, "bundled_samples": 64, "cfg_scale": 5.0,
            "threads": 1}
#: name: overrides (after solver choice); the ODE baseline first
METHODS = {
    "euler (ODE)": ["solver=euler"],
    "distill sgd lr 1": ["solver=optimize", "solver.mode=distill"],
    "distill sgd lr 0.5": ["solver=optimize", "solver.mode=distill", "solver.lr=0.5"],
    "distill adam lr 0.1, w=1/σ": ["solver=optimize", "solver.mode=distill", "solver.optimizer=adam", "solver.lr=0.1",
                                   "solver.weight_power=-1"],
}


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


def main(argv: list[str]) -> str:
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(argv))
    torch.set_num_threads(int(cfg.threads))
    n_mix, n_img, steps = (64, 4, 5) if cfg.fast else (cfg.mixture_samples, cfg.bundled_samples, cfg.steps)
    model = Mixture()
    lines = [f"**Mixture** (`model=mixture`, float64, {n_mix} samples, {steps} iterations/steps, karras grid; "
             "NFE = steps for every row)", "", "| method | NFE | NLL | spread | TV |", "| --- | --- | --- | --- | --- |"]
    data = model.sample_data(n_mix, torch.Generator().manual_seed(0))
    st = mixture_stats(model, data)
    lines.append(f"| true samples | — | {st['nll']:.2f} | {st['spread']:.2f} | {st['tv']:.3f} |")
    base = ["model=mixture", "dtype=float64", f"num_samples={n_mix}", f"batch_size={n_mix}", f"steps={steps}"]
    for name, extra in METHODS.items():
        res = run(base + extra)
        st = mixture_stats(model, res.latents)
        lines.append(f"| {name} | {res.record['metrics']['nfe']:.0f} | {st['nll']:.2f} | {st['spread']:.2f} | {st['tv']:.3f} |")

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
    for name, extra in METHODS.items():
        res = run(base + extra)
        m = res.record["metrics"]
        prompts = [str(k % 4) for k in range(n_img)]  # the engine gives sample k the default prompt k mod 4
        lines.append(f"| {name} | {m['nfe']:.0f} | {m['fid']:.3f} | {m['clip_score']:.2f} | "
                     f"{clipped_fraction(res.images):.3f} | {diversity(res.images, prompts, features):.3f} | "
                     f"{diversity(res.images, ['all'] * n_img, features):.3f} |")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (out / "momentum_distill_table.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main(sys.argv[1:]))
