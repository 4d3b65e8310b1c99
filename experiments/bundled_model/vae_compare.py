"""Compare VAEs of the bundled pipeline on the same latents (issue 29):
``python -m experiments.bundled_model.vae_compare --out DIR --vae v2=PATH --vae v3=PATH [--n-gen 256]``.

A VAE whose encoder is the shipped one (a decoder-only fine-tune) leaves the UNet's latent space
unchanged, so the pipeline's latents are sampled once (the shipped UNet, diffusers'
EulerDiscreteScheduler, ``--steps`` steps, CFG ``--cfg``, prompts and seeds as in ``evaluate``) and
decoded by each VAE: the generations differ by the decoder alone. For each VAE: reconstruction
PSNR, 99.9th-percentile pixel error, stray marks and edge width (framework.bundled.marks) of
fresh scenes; the judge on reconstructions of single-shape scenes (half striped); stray marks,
edge width, judge colour/shape and Fréchet distance of CLIP features (vs real) of the
generations. Writes ``scores.json`` and ``side_by_side.png`` (the model card's 8 prompts, one row
each, ``--seeds`` seeds per VAE side by side) to ``--out``.

``--reconstructions-only``: VAEs of other latent spaces (a new encoder, another downsampling factor),
whose latents the shipped UNet cannot make: reconstruction figures alone, and ``side_by_side.png``
shows 8 fresh scenes (half striped) and each VAE's reconstructions of them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from experiments.bundled_model.evaluate import EVAL_SEED, GRID_PROMPTS, clip_features, frechet, grid_prompts, load_pipeline
from experiments.bundled_model.vae import reconstruct
from experiments.harness import psnr, save_grid
from framework.bundled import PIPELINE_DIR, load_clip, load_judge, marks
from framework.bundled.world import label_indices, sample_scenes


@torch.no_grad()
def latents_for(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int, cfg: float,
                batch: int = 64) -> torch.Tensor:
    """The pipeline's final latents (scaled units) for prompts, one seeded generator per image."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        out.append(pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=cfg, generator=gens,
                        output_type="latent").images)
    return torch.cat(out)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Images in [0, 1] of scaled latents."""
    sf = vae.config.scaling_factor
    return torch.cat([(vae.decode(latents[i:i + batch] / sf).sample.clamp(-1, 1) + 1) / 2
                      for i in range(0, len(latents), batch)])


def cached_latents(path: Path, make) -> torch.Tensor:
    if path.exists():
        return load_file(path)["latents"]
    lat = make()
    save_file({"latents": lat.contiguous()}, path)
    return lat


def score_vae(vae: AutoencoderKL, real, single, gen_latents: torch.Tensor | None, prompts_set, judge, clip,
              feats_real: torch.Tensor) -> dict[str, float]:
    s: dict[str, float] = {}
    ref = (real.images + 1) / 2
    rec = (reconstruct(vae, real.images).clamp(-1, 1) + 1) / 2
    s["vae_psnr"] = float(psnr(rec, ref).mean())
    s["vae_error_p999"] = marks.error_quantile(rec, ref)
    m = marks.measure_scenes(rec, real.labels)
    s["vae_stray"], s["vae_stray_images"], s["vae_edge_width"] = float(m["stray_share"].mean()), m["stray_images"], \
        m["edge_width"]
    truth = label_indices(single.labels)
    pred = judge.predict(reconstruct(vae, single.images).clamp(-1, 1))
    for k in pred:
        s[f"vae_judge_{k}"] = float((pred[k] == truth[k]).float().mean())
    s["vae_striped_recall"] = float(pred["striped"][truth["striped"] == 1].float().mean())
    if gen_latents is None:  # --reconstructions-only
        return s
    gen = decode(vae, gen_latents)
    got = judge.predict(gen * 2 - 1)
    m = marks.measure_prompts(gen, prompts_set.captions, striped=got["striped"])
    s["gen_stray"], s["gen_stray_images"], s["gen_edge_width"] = float(m["stray_share"].mean()), m["stray_images"], \
        m["edge_width"]
    want = label_indices(prompts_set.labels)
    s["gen_colour"] = float((got["colour"] == want["colour"]).float().mean())
    s["gen_shape"] = float((got["shape"] == want["shape"]).float().mean())
    s["fd_clip_generated"] = frechet(clip_features(clip, gen * 2 - 1), feats_real)
    return s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vae", action="append", required=True, help="NAME=FOLDER of a diffusers AutoencoderKL")
    ap.add_argument("--grid-only", action="append", default=[],
                    help="NAME: a --vae drawn in side_by_side.png but not scored (scored before)")
    ap.add_argument("--n-gen", type=int, default=256)
    ap.add_argument("--n-real", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per prompt in side_by_side.png")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reconstructions-only", action="store_true",
                    help="score reconstructions only (VAEs of another latent space than the shipped UNet's)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = load_pipeline(PIPELINE_DIR)
    prompts_set = sample_scenes(a.n_gen, EVAL_SEED + 2, omit_rate=0.3)  # as in evaluate
    seeds = list(range(EVAL_SEED, EVAL_SEED + a.n_gen))
    tag = f"{a.n_gen}_{a.steps}_{a.cfg:g}"
    gen_latents = grid_latents = None
    if not a.reconstructions_only:
        gen_latents = cached_latents(a.out / f"latents_{tag}.safetensors",
                                     lambda: latents_for(pipe, prompts_set.captions, seeds, a.steps, a.cfg))
        grid_latents = cached_latents(a.out / f"grid_latents_{a.seeds}_{a.steps}_{a.cfg:g}.safetensors",
                                      lambda: latents_for(pipe, *grid_prompts(a.seeds), a.steps, a.cfg))
        print(f"latents: {time.time() - t0:.0f} s", flush=True)
    real = sample_scenes(a.n_real, EVAL_SEED, two_shape_rate=0.3, concept_rate=0.2)  # as in evaluate (world)
    single = sample_scenes(a.n_real, EVAL_SEED + 1, concept_rate=0.5)
    judge = load_judge()
    clip, _ = load_clip()
    feats_real = clip_features(clip, single.images)
    scores: dict = {"settings": vars(a) | {"out": str(a.out), "vae": a.vae}}
    real_m = marks.measure_scenes((real.images + 1) / 2, real.labels)
    scores["real"] = {"stray": float(real_m["stray_share"].mean()), "edge_width": real_m["edge_width"]}
    rows = {}
    if a.reconstructions_only:
        rows["real"] = ((single.images[:8] + 1) / 2)[None]
    for spec in a.vae:
        name, folder = spec.split("=", 1)
        vae = AutoencoderKL.from_pretrained(folder).eval()
        if grid_latents is None:
            rows[name] = ((reconstruct(vae, single.images[:8]).clamp(-1, 1) + 1) / 2)[None]
        else:
            rows[name] = decode(vae, grid_latents).reshape(len(GRID_PROMPTS), a.seeds, 3, 64, 64)
        if name in a.grid_only:
            continue
        scores[name] = score_vae(vae, real, single, gen_latents, prompts_set, judge, clip, feats_real)
        print(name, json.dumps(scores[name]), f"{time.time() - t0:.0f} s", flush=True)
    side = torch.cat(list(rows.values()), dim=1).flatten(0, 1)  # a row: each VAE's seeds in turn (or: real, then each VAE)
    save_grid(side, a.out / "side_by_side.png", nrow=8 if a.reconstructions_only else a.seeds * len(rows), scale=2, pad=1)
    (a.out / "scores.json").write_text(json.dumps(scores, indent=1))
    return scores


if __name__ == "__main__":
    main()
