"""Train the bundled flow model: ``python -m experiments.bundled_flow [overrides]``.

Stages (``stages=[...]``, in the given order): cache, flow, export, check, evaluate (``check``: a
quick judge look at a few CFG scales). ``flow`` resumes from
its checkpoint in ``out_dir`` and stops at its step count or ``flow.max_minutes``, so a CPU build can
be spread over several runs. The VP model (framework/bundled/weights/pipeline) gives the latent
space (its VAE), the text tower and the teacher (its UNet). ``fast=true`` is a seconds-long smoke
run; ``install=true`` exports into framework/bundled/weights/flow and writes the sample grid next to
the model card; ``--config-name gpu`` is the GPU recipe (gpu.yaml).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.harness import Experiment, entry, resolve_device, resolve_training, stage_results

STAGES = ("cache", "flow", "export", "check", "evaluate")
HERE = Path(__file__).resolve().parent


def resolve(cfg: DictConfig) -> DictConfig:
    """Apply ``fast_profile`` when fast, and the default output folder."""
    return resolve_training(cfg, STAGES, ("outputs/bundled_flow_run", "outputs/bundled_flow_fast"))


def run(ex: Experiment) -> dict:
    """Run the configured stages; returns the record, also written to ``out_dir/record.json``."""
    from experiments.bundled_flow.evaluate import check, evaluate
    from experiments.bundled_flow.export import export, export_target
    from experiments.bundled_flow.train import build_cache, train_flow

    cfg = ex.cfg = resolve(ex.cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    target = export_target(cfg.install, out)
    grid = (target.parent.parent / "MODEL_CARD_flow_grid.png") if cfg.install else out / "sample_grid.png"
    record_path = out / "record.json"
    actions = {
        "cache": lambda: build_cache(cfg, out, device),
        "flow": lambda: train_flow(cfg, out, device),
        "export": lambda: export(cfg, out, target),
        "check": lambda: check(cfg, target),
        "evaluate": lambda: evaluate(cfg, target, grid),
    }
    record: dict = {}
    for stage in cfg.stages:
        t0 = time.time()
        print(f"== stage {stage}")
        result = actions[stage]()
        results = stage_results(record_path, device, stage, time.time() - t0)
        if stage == "check":
            results.setdefault("checks", []).append({"step": _step(out), **result})
        if stage == "evaluate":
            results["scores"], results["scores_of"] = result, str(target)
        record = ex.record(record_path, results)
    return record


def _step(out: Path) -> int | None:
    """The training step of the EMA transformer in ``out/transformer`` (what export and check measure), if known
    (not the latest checkpoint's: a check run while training resumes measures the last finished run)."""
    saved = out / "transformer" / "training_step.json"
    return json.loads(saved.read_text())["step"] if saved.exists() else None


def main(argv: list[str] | None = None) -> dict:
    return run(Experiment.compose(HERE, argv))


if __name__ == "__main__":
    entry(main)
