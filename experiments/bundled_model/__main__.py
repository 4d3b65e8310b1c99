"""Train the bundled default model: ``python -m experiments.bundled_model [hydra overrides]``.

Stages (``stages=[...]``, run in the given order): tokenizer, clip, judge, vae, unet, export,
evaluate. Each training stage resumes from its checkpoint in ``out_dir`` and stops at its step
count or its ``max_minutes``, so a CPU rebuild can be spread over several runs. ``fast=true`` is a
seconds-long smoke run with tiny models; ``install=true`` exports into the shipped weights
(framework/bundled/weights) and writes the sample grid next to the model card.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.bundled_model.common import resolve_device

STAGES = ("tokenizer", "clip", "judge", "vae", "unet_cache", "unet", "export", "evaluate")
CONFIG_DIR = Path(__file__).resolve().parent


def resolve(cfg: DictConfig) -> DictConfig:
    """Apply ``fast_profile`` when fast, and the default output folder."""
    if cfg.fast:
        cfg = OmegaConf.merge(cfg, cfg.fast_profile)
    if cfg.out_dir is None:
        cfg.out_dir = "outputs/bundled_model_fast" if cfg.fast else "outputs/bundled_model"
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    return cfg


def run(cfg: DictConfig) -> dict:
    """Run the configured stages; returns (and writes to ``out_dir/record.json``) the record."""
    from experiments.bundled_model.clip import train_clip
    from experiments.bundled_model.evaluate import evaluate
    from experiments.bundled_model.export import export, export_target
    from experiments.bundled_model.judge import train_judge
    from experiments.bundled_model.tokenizer import build_tokenizer
    from experiments.bundled_model.unet import build_cache, train_unet
    from experiments.bundled_model.vae import train_vae

    cfg = resolve(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    target = export_target(cfg.install, out, cfg.unet.name)
    grid = (target.parent if cfg.install else target) / "sample_grid.png"
    record_path = out / "record.json"
    run_info = dict(schema_version=1, config=OmegaConf.to_container(cfg, resolve=True),
                    device=str(device), torch=torch.__version__, machine=platform.machine())
    actions = {
        "tokenizer": lambda: build_tokenizer(out / "tokenizer"),
        "clip": lambda: train_clip(cfg, out, device),
        "judge": lambda: train_judge(cfg, out, device),
        "vae": lambda: train_vae(cfg, out, device),
        "unet_cache": lambda: build_cache(cfg, out, device),
        "unet": lambda: train_unet(cfg, out, device),
        "export": lambda: export(out, target, cfg.unet.name),
        "evaluate": lambda: evaluate(cfg, target, grid),
    }
    for stage in cfg.stages:
        t0 = time.time()
        print(f"== stage {stage}")
        result = actions[stage]()
        # re-read: stages may run in parallel processes sharing out_dir
        record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
        record.update(run_info)
        key = cfg.unet.name if stage == "unet" else stage
        entry = record["stages"].setdefault(key, {"seconds": 0.0, "runs": 0})
        entry["seconds"] += time.time() - t0
        entry["runs"] += 1
        entry["device"] = str(device)
        if stage == "evaluate":
            record["scores"], record["scores_of"] = result, str(target)
        tmp = record_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, record_path)
    return json.loads(record_path.read_text())


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    run(cfg)


if __name__ == "__main__":
    main()
