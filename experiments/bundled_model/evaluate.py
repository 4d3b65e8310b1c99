"""Stage ``evaluate``: the model card's scores, measured on the exported files.

- VAE reconstruction PSNR on fresh training-distribution scenes, the 99.9th percentile of the
  pixel error, and stray marks and edge width (framework.bundled.marks) of the scenes and of
  their reconstructions (``real_*``, ``vae_*``) and of the generations (``gen_stray*``, ``gen_edge_width``);
- CLIP zero-shot colour / shape accuracy on fresh single-shape scenes (prompt ensembles);
- judge accuracy on fresh single-shape scenes (half of them striped), and on their VAE
  reconstructions (what the latents keep; ``vae_striped_recall``: striped scenes still judged striped);
- generation: for single-shape prompts, the rate at which the judge finds the prompted colour and
  shape (pipeline scheduler, ``steps`` steps, CFG ``guidance_scale``), and the Fréchet distance
  of CLIP image features, generated vs real and unconditional vs real; the rate of generated
  (prompted and unconditional) images the judge calls striped (never prompted; 20 % of the world);
- a sample grid (prompts × seeds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from omegaconf import DictConfig
from scipy import linalg
from transformers import CLIPModel, CLIPTokenizer

from experiments.bundled_model.vae import reconstruct, vae_psnr
from experiments.harness import save_grid
from framework.bundled import load_clip, load_judge, marks
from framework.bundled.world import COLOURS, SHAPES, label_indices, sample_scenes

EVAL_SEED = 31_337_000  # never used by training
GRID_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow diamond",
                "a large purple circle on a white background", "a small orange square",
                "a white triangle on a black background", "a red circle above a blue square"]


def grid_prompts(n_seeds: int) -> tuple[list[str], list[int]]:
    """The sample grid's prompts and seeds: each of GRID_PROMPTS with seeds 0 … n_seeds − 1 (a row per prompt)."""
    return [p for p in GRID_PROMPTS for _ in range(n_seeds)], list(range(n_seeds)) * len(GRID_PROMPTS)


def load_pipeline(folder: Path | str, scheduler: str = "euler") -> StableDiffusionPipeline:
    """A bundled-format pipeline folder, quiet, with diffusers' EulerDiscreteScheduler (the issues'
    setting; the shipped scheduler config stays DDIM's) or, with ``scheduler="pipeline"``, its own."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    elif scheduler != "pipeline":
        raise ValueError(f"evaluate.scheduler={scheduler!r}: choose euler or pipeline")
    return pipe


@torch.no_grad()
def clip_features(clip: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image embeddings of images in [-1, 1]."""
    f = clip.get_image_features(pixel_values=images)
    f = getattr(f, "pooler_output", f)
    return f / f.norm(dim=-1, keepdim=True)


@torch.no_grad()
def text_features(clip: CLIPModel, tok: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings."""
    t = tok(prompts, padding=True, return_tensors="pt")
    f = clip.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
    f = getattr(f, "pooler_output", f)
    return f / f.norm(dim=-1, keepdim=True)


def zero_shot(clip: CLIPModel, tok: CLIPTokenizer, images: torch.Tensor,
              labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Zero-shot colour and shape accuracy with prompt ensembles over the other attribute."""
    img = clip_features(clip, images)
    result = {}
    for head, classes, others, fmt in (
            ("colour", COLOURS, SHAPES, "a {size}{c} {o}"), ("shape", SHAPES, COLOURS,
                                                             "a {size}{o} {c}")):
        protos = []
        for c in classes:
            prompts = [fmt.format(size=s, c=c, o=o).replace("a o", "an o")
                       for o in others for s in ("", "small ", "large ")]
            p = text_features(clip, tok, prompts).mean(0)
            protos.append(p / p.norm())
        pred = (img @ torch.stack(protos).T).argmax(-1)
        result[f"clip_zero_shot_{head}"] = float((pred == labels[head]).float().mean())
    return result


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of two feature sets (Gaussian fits)."""
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int,
             guidance: float, batch: int) -> torch.Tensor:
    """Images in [-1, 1] for prompts, one seeded generator per image."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        res = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="pt")
        out.append(res.images * 2 - 1)
    return torch.cat(out)


def reconstruction_marks(vae, images: torch.Tensor, labels: list) -> dict[str, float]:
    """Stray marks (framework.bundled.marks) of real scenes (≈ 0 by construction) and of their
    reconstructions, the 99.9th percentile of the reconstructions' pixel error and the edge widths."""
    ref = (images + 1) / 2
    rec = (reconstruct(vae, images).clamp(-1, 1) + 1) / 2
    real, got = marks.measure_scenes(ref, labels), marks.measure_scenes(rec, labels)
    return {"real_stray": float(real["stray_share"].mean()), "real_edge_width": real["edge_width"],
            "vae_stray": float(got["stray_share"].mean()), "vae_stray_images": got["stray_images"],
            "vae_edge_width": got["edge_width"], "vae_error_p999": marks.error_quantile(rec, ref)}


def evaluate(cfg: DictConfig, weights: Path, grid_path: Path) -> dict[str, float]:
    """All scores of the exported weights under ``weights``; writes the sample grid."""
    e = cfg.evaluate
    pipe = load_pipeline(weights / "pipeline", e.scheduler)
    clip, tok = load_clip(weights / "clip")
    clip = clip.float()
    judge = load_judge(weights / "judge")
    scores: dict[str, float] = {}

    real = sample_scenes(e.n_real, EVAL_SEED, **cfg.world)
    scores["vae_psnr"] = vae_psnr(pipe.vae, real.images)
    scores.update(reconstruction_marks(pipe.vae, real.images, real.labels))

    single = sample_scenes(e.n_real, EVAL_SEED + 1, concept_rate=0.5)
    truth = label_indices(single.labels)
    scores.update(zero_shot(clip, tok, single.images, truth))
    pred = judge.predict(single.images)
    pred_rec = judge.predict(reconstruct(pipe.vae, single.images).clamp(-1, 1))  # what survives the VAE
    for k in pred:
        scores[f"judge_{k}"] = float((pred[k] == truth[k]).float().mean())
        scores[f"vae_judge_{k}"] = float((pred_rec[k] == truth[k]).float().mean())
    striped = truth["striped"] == 1
    scores["vae_striped_recall"] = float(pred_rec["striped"][striped].float().mean())

    prompts_set = sample_scenes(e.n_generate, EVAL_SEED + 2, omit_rate=cfg.world.omit_rate)
    seeds = list(range(EVAL_SEED, EVAL_SEED + e.n_generate))
    gen = generate(pipe, prompts_set.captions, seeds, e.steps, e.guidance_scale, e.batch_size)
    want = label_indices(prompts_set.labels)
    got = judge.predict(gen)
    scores["gen_colour"] = float((got["colour"] == want["colour"]).float().mean())
    scores["gen_shape"] = float((got["shape"] == want["shape"]).float().mean())
    scores["gen_striped"] = float(got["striped"].float().mean())  # the world draws 20 % striped
    m = marks.measure_prompts((gen.clamp(-1, 1) + 1) / 2, prompts_set.captions, striped=got["striped"])
    scores["gen_stray"], scores["gen_stray_images"] = float(m["stray_share"].mean()), m["stray_images"]
    scores["gen_edge_width"] = m["edge_width"]
    uncond = generate(pipe, [""] * e.n_generate, seeds, e.steps, 1.0, e.batch_size)
    scores["uncond_striped"] = float(judge.predict(uncond)["striped"].float().mean())
    feats_real = clip_features(clip, single.images)
    scores["fd_clip_generated"] = frechet(clip_features(clip, gen), feats_real)
    scores["fd_clip_unconditional"] = frechet(clip_features(clip, uncond), feats_real)

    n_seeds = 6 if not cfg.fast else 1
    grid = generate(pipe, *grid_prompts(n_seeds), e.steps,
                    e.guidance_scale, e.batch_size)
    save_grid((grid + 1) / 2, grid_path, nrow=n_seeds, scale=2, pad=0)  # a row per prompt
    scores["settings"] = dict(steps=e.steps, guidance_scale=e.guidance_scale,
                              scheduler=type(pipe.scheduler).__name__, n_generate=e.n_generate,
                              n_real=e.n_real)
    print(json.dumps(scores, indent=1))
    return scores
