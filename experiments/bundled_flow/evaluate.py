"""Stage ``evaluate``: the flow model card's scores, measured on the exported folder through the engine.

The same prompts, seeds, judge, CLIP and real scenes as the VP model's evaluation
(experiments/bundled_model/evaluate.py), so the two cards' figures compare:

- generation through samplerlab's engine (``solver=euler``, ``schedule=flow_match``: FlowMatchEuler's
  grid of the shipped scheduler, ``steps`` steps, CFG ``guidance_scale``; the engine equals the
  diffusers pipeline's own loop, tests/bundled/test_bundled_flow.py): the rate at which the judge
  finds the prompted colour and shape on ``n_generate`` single-shape prompts of the world, the rate
  judged striped (prompted, and unconditional: empty prompt, no CFG), and the Fréchet distance of
  CLIP image features to ``n_real`` real single-shape scenes (generated and unconditional);
- a sample grid (the VP card's prompts × seeds 0–5).

Stage ``check`` is the quick look used while training: the judge's colour/shape/striped rates on
``check_prompts`` prompts (other seeds than the evaluation's) at each CFG scale of ``check_scales``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.bundled_model.evaluate import EVAL_SEED, GRID_PROMPTS, clip_features, frechet
from experiments.harness import save_grid
from framework.bundled import load_clip, load_judge
from framework.bundled.world import label_indices, sample_scenes


def flow_model(folder: Path):
    """The exported folder as a samplerlab model (the sd3 adapter, no T5)."""
    from framework.models.sd3 import StableDiffusion3

    return StableDiffusion3(path=str(folder), use_t5=False)


@torch.no_grad()
def generate(model, prompts: list[str], seed: int, steps: int, guidance: float, batch: int,
             extra: tuple[str, ...] = ()) -> torch.Tensor:
    """Images in [-1, 1] through the engine: sample k has the noise of (seed, k) and prompt k
    (``extra``: more overrides, e.g. a conditioning plugin)."""
    from framework.entry.api import run

    def quote(p: str) -> str:
        return "'" + p.replace("'", "\\'") + "'"

    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        guide = ["guidance=[cfg]", f"cfg_scale={guidance}"] if guidance != 1.0 else ["guidance=[]"]
        res = run(["solver=euler", "schedule=flow_match", f"steps={steps}", f"seed={seed + i}",
                   f"num_samples={len(chunk)}", f"batch_size={len(chunk)}", "save_images=false",
                   f"prompts=[{','.join(quote(p) for p in chunk)}]", *guide, *extra], model=model)
        out.append(res.images.float() * 2 - 1)
    return torch.cat(out)


def evaluate(cfg: DictConfig, weights: Path, grid_path: Path) -> dict:
    """All scores of the folder ``weights``; writes the sample grid to ``grid_path``."""
    e = cfg.evaluate
    model = flow_model(weights)
    clip, _ = load_clip()
    judge = load_judge()
    scores: dict = {}
    single = sample_scenes(e.n_real, EVAL_SEED + 1, concept_rate=0.5)
    feats_real = clip_features(clip, single.images)

    prompts_set = sample_scenes(e.n_generate, EVAL_SEED + 2, omit_rate=cfg.world.omit_rate)
    gen = generate(model, prompts_set.captions, EVAL_SEED, e.steps, e.guidance_scale, e.batch_size)
    want = label_indices(prompts_set.labels)
    got = judge.predict(gen)
    scores["gen_colour"] = float((got["colour"] == want["colour"]).float().mean())
    scores["gen_shape"] = float((got["shape"] == want["shape"]).float().mean())
    scores["gen_striped"] = float(got["striped"].float().mean())
    scores["fd_clip_generated"] = frechet(clip_features(clip, gen), feats_real)
    print(json.dumps(scores), flush=True)
    uncond = generate(model, [""] * e.n_generate, EVAL_SEED, e.steps, 1.0, e.batch_size)
    scores["uncond_striped"] = float(judge.predict(uncond)["striped"].float().mean())
    scores["fd_clip_unconditional"] = frechet(clip_features(clip, uncond), feats_real)

    n_seeds = 6 if not cfg.fast else 1
    rows = [generate(model, [p] * n_seeds, 0, e.steps, e.guidance_scale, n_seeds) for p in GRID_PROMPTS]
    save_grid((torch.cat(rows) + 1) / 2, grid_path, nrow=n_seeds, scale=2, pad=0)  # a row per prompt
    scores["settings"] = dict(steps=e.steps, guidance_scale=e.guidance_scale, solver="euler",
                              schedule="flow_match", shift=float(model.pipe.scheduler.config.shift),
                              n_generate=e.n_generate, n_real=e.n_real)
    print(json.dumps(scores, indent=1))
    return scores


def check(cfg: DictConfig, weights: Path) -> dict:
    """Judge rates on ``evaluate.check_prompts`` fresh prompts at each ``evaluate.check_scales`` CFG scale."""
    e = cfg.evaluate
    model, judge = flow_model(weights), load_judge()
    prompts = sample_scenes(e.check_prompts, EVAL_SEED + 7, omit_rate=cfg.world.omit_rate)
    want = label_indices(prompts.labels)
    rows = {}
    for g in e.check_scales:
        got = judge.predict(generate(model, prompts.captions, EVAL_SEED + 100, e.steps, float(g), e.batch_size))
        rows[f"cfg_{g}"] = {k: float((got[k] == want[k]).float().mean()) for k in ("colour", "shape")}
        rows[f"cfg_{g}"]["striped"] = float(got["striped"].float().mean())
        print(json.dumps({f"cfg_{g}": rows[f"cfg_{g}"]}), flush=True)
    return rows
