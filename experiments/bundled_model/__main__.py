"""Train the bundled default model: ``python -m experiments.bundled_model [overrides]``.

Stages (``stages=[...]``, run in the given order): tokenizer, clip, judge, vae, unet, export,
evaluate; and, not in the default list, ``seed`` (copy the shipped parts named in ``seed_parts``
into ``out_dir``, and the VAE folder ``vae_from`` when set, to rebuild the rest on them) and
``vae_pick`` (keep the best of the VAEs trained in the ``vae_candidates`` folders: gpu_v3.sh).
Each training stage resumes from its checkpoint in ``out_dir`` and stops at its step count or its
``max_minutes``, so a CPU rebuild can be spread over several runs. ``fast=true`` is a
seconds-long smoke run with tiny models; ``install=true`` exports into the shipped weights
(framework/bundled/weights) and writes the sample grid next to the model card;
``--config-name gpu`` is the GPU recipe (gpu.yaml).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.harness import Experiment, entry, resolve_device, resolve_training, stage_results

STAGES = ("seed", "tokenizer", "clip", "judge", "vae", "vae_pick", "unet_cache", "unet", "export", "evaluate")
HERE = Path(__file__).resolve().parent


def resolve(cfg: DictConfig) -> DictConfig:
    """Apply ``fast_profile`` when fast, and the default output folder."""
    return resolve_training(cfg, STAGES, ("outputs/bundled_model", "outputs/bundled_model_fast"))


def run(ex: Experiment) -> dict:
    """Run the configured stages; returns the record, also written to ``out_dir/record.json``
    (``results``: seconds and runs per stage, and the scores of the last ``evaluate``)."""
    from experiments.bundled_model.clip import train_clip
    from experiments.bundled_model.common import seed_from_shipped
    from experiments.bundled_model.evaluate import evaluate
    from experiments.bundled_model.export import export, export_target
    from experiments.bundled_model.judge import train_judge
    from experiments.bundled_model.tokenizer import build_tokenizer
    from experiments.bundled_model.unet import build_cache, train_unet
    from experiments.bundled_model.vae import pick_vae, train_vae

    cfg = ex.cfg = resolve(ex.cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    target = export_target(cfg.install, out, cfg.unet.name)
    grid = (target.parent if cfg.install else target) / "sample_grid.png"
    record_path = out / "record.json"
    actions = {
        "seed": lambda: seed_from_shipped(out, list(cfg.seed_parts), cfg.vae_from),
        "tokenizer": lambda: build_tokenizer(out / "tokenizer"),
        "clip": lambda: train_clip(cfg, out, device),
        "judge": lambda: train_judge(cfg, out, device),
        "vae": lambda: train_vae(cfg, out, device),
        "vae_pick": lambda: pick_vae(out, list(cfg.vae_candidates)),
        "unet_cache": lambda: build_cache(cfg, out, device),
        "unet": lambda: train_unet(cfg, out, device),
        "export": lambda: export(out, target, cfg.unet.name),
        "evaluate": lambda: evaluate(cfg, target, grid),
    }
    record: dict = {}
    for stage in cfg.stages:
        t0 = time.time()
        print(f"== stage {stage}")
        result = actions[stage]()
        key = cfg.unet.name if stage == "unet" else stage
        results = stage_results(record_path, device, key, time.time() - t0)
        if stage == "evaluate":
            results["scores"], results["scores_of"] = result, str(target)
        record = ex.record(record_path, results)
    return record


def main(argv: list[str] | None = None) -> dict:
    return run(Experiment.compose(HERE, argv))


if __name__ == "__main__":
    entry(main)
