"""Issue 21's "striped when asked": the flow card's 256 evaluation prompts with a learned token.

    python -m experiments.bundled_flow.asked token=<learned_embeds.safetensors> [pipeline=<folder>] \\
        [place=shape] [seed=31337000] [prompt_seed=31337002] [n=256] [out=asked.json]

The prompts are the card's (``evaluate``: single-shape world captions, seed EVAL_SEED + 2) with the
token placed as it was trained (``place``: ``colour``, before the colour word, or ``shape``, after the
shape word); the card's sampler (experiments/bundled_flow/config.yaml ``evaluate``: 20 Euler steps on
``flow_match``, CFG 5), sampling seed ``seed`` (default the card's,
never used to choose a token's settings; choose them on other ``seed`` and ``prompt_seed``). ``pipeline``: the model to run (an adapted folder written by
``experiments.textual_inversion train_kv=true``), else the shipped flow model. Reports, for the
prompts with the token and for the same prompts without it (what the model does unasked): the rates
the judge finds stripes, the asked colour and the asked shape, stripes with the asked colour, and
the Fréchet distance of CLIP image features to the card's real scenes (``evaluate.n_real``, half striped).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from experiments.bundled_flow.__main__ import HERE
from experiments.bundled_flow.evaluate import flow_model, generate
from experiments.bundled_model.evaluate import EVAL_SEED, clip_features, frechet
from experiments.harness import Experiment
from experiments.textual_inversion.__main__ import place_token
from framework.bases.embeddings import load_embeddings
from framework.bundled import WEIGHTS_DIR, load_clip, load_judge
from framework.bundled.world import label_indices, sample_scenes
from framework.plugin import ConfigError


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv)
    if "token" not in args:
        raise ConfigError("give token=<learned_embeds.safetensors> (python -m experiments.textual_inversion model=bundled_flow)")
    e, world = (cfg := Experiment.compose(HERE, []).cfg).evaluate, cfg.world  # the card's evaluation settings
    token_file, place = args["token"], args.get("place", "shape")
    seed, prompt_seed = int(args.get("seed", EVAL_SEED)), int(args.get("prompt_seed", EVAL_SEED + 2))
    n = int(args.get("n", e.n_generate))
    torch.set_num_threads(int(args.get("threads", "1")))
    (token,) = load_embeddings(token_file)
    model = flow_model(Path(args.get("pipeline", WEIGHTS_DIR / "flow")))
    judge, (clip, _) = load_judge(), load_clip()
    feats_real = clip_features(clip, sample_scenes(e.n_real, EVAL_SEED + 1, concept_rate=0.5).images)
    scenes = sample_scenes(n, prompt_seed, omit_rate=world.omit_rate)
    want = label_indices(scenes.labels)
    use = ("conditioning=[textual_inversion]", f"conditioning.textual_inversion.path='{token_file}'")
    asked = [place_token(c, lab, token, place) for c, lab in zip(scenes.captions, scenes.labels)]
    out: dict = {"token": token_file, "pipeline": args.get("pipeline"), "place": place, "seed": seed, "n": n,
                 "prompt_seed": prompt_seed, "example_prompt": asked[0]}
    for name, prompts, extra in (("asked", asked, use), ("plain", scenes.captions, ())):
        images = generate(model, prompts, seed, e.steps, e.guidance_scale, e.batch_size, extra)
        got = judge.predict(images)
        striped, colour = got["striped"].bool(), got["colour"] == want["colour"]
        out[name] = {"striped": float(striped.float().mean()), "colour": float(colour.float().mean()),
                     "shape": float((got["shape"] == want["shape"]).float().mean()),
                     "striped_and_colour": float((striped & colour).float().mean()),
                     "fd_clip": frechet(clip_features(clip, images), feats_real)}
        print(name, json.dumps(out[name]), flush=True)
    if "out" in args:
        Path(args["out"]).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    from framework.entry.quiet import quiet_libraries

    with quiet_libraries():
        main(sys.argv[1:])
