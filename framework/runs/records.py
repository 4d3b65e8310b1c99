"""The run record (``record.json``) and the run key.

The record holds ``schema_version``, the run key (a hash of the resolved config and of the weights
it reads: reruns and resumed sweeps find their folders by it), the resolved config, the plugins per
hook, the σ grid, metrics, seed, shard, failures, versions and where the images are. The run folder
that holds it: :mod:`framework.runs.folder`.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import framework
from framework.core.memo import Memo
from framework.core.run import Result, Run

SCHEMA_VERSION = 1
#: Keys that say where or how results are stored, or how fast they are computed (compile, memory
#: layout: the same samples within float rounding), not what is computed: left out of the run key.
NON_SEMANTIC_KEYS = ("output_dir", "save_images", "hydra", "name", "resume", "objective", "compile", "compile_mode",
                     "channels_last")
#: Keys that split one evaluation over processes: left out of the merge key (shards share it).
SHARD_KEYS = ("shard_index", "shard_count")


def resolved_config(cfg: Any) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return {k: v for k, v in data.items() if k not in ("hydra",)}


#: Hashes of weight folders by (folder, listing of names, sizes, mtimes): a sweep reads the same
#: weights for every run; a changed file changes the listing.
FOLDER_HASHES: Memo[str] = Memo("weight folder hashes", 32)
#: The git commit of the checkout (asked once per process).
GIT_SHA: Memo[str | None] = Memo("git commit", 1)


def _folder_hash(folder: str, listing: tuple) -> str:
    return FOLDER_HASHES.get((folder, listing), lambda: _hash_files(folder, listing))


def _hash_files(folder: str, listing: tuple) -> str:
    h = hashlib.sha256()
    for rel, size, mtime in listing:
        h.update(f"{rel}:{size}:".encode())
        path = Path(folder) / rel
        if size <= 64 * 2**20:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        else:  # multi-GB checkpoints: size and modification time stand in for the bytes
            h.update(str(mtime).encode())
    return h.hexdigest()[:16]


def weights_fingerprint(config: dict[str, Any]) -> dict[str, str]:
    """Hashes of the weights a run reads: the bundled model (its CLIP and judge also score other
    models) and a local ``model.path`` folder. Part of the run key, so that a rerun after the
    weights change is not answered from an old run folder (files ≤ 64 MB by content, larger by
    size and mtime; a hub id that is not a local folder is not fingerprinted)."""
    from framework.bundled import WEIGHTS_DIR

    out = {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    for label, folder in (("bundled", WEIGHTS_DIR), ("model.path", model.get("path"))):
        if folder and Path(folder).is_dir():
            root = Path(folder).resolve()
            listing = tuple((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                            for f in sorted(root.rglob("*")) if f.is_file())
            out[label] = _folder_hash(str(root), listing)
    return out


def run_key(config: dict[str, Any], weights: dict[str, str] | None = None) -> str:
    """A short hash of the resolved config (without where-to-store keys) and of the weights it
    reads (:func:`weights_fingerprint`, or ``weights`` when the caller has it): same config and
    weights, same key."""
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}
    semantic["weights"] = weights_fingerprint(config) if weights is None else weights
    blob = json.dumps(semantic, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def merge_key(config: dict[str, Any], weights: dict[str, str] | None = None) -> str:
    """The run key without the shard settings: every shard of one evaluation has the same."""
    return run_key({k: v for k, v in config.items() if k not in SHARD_KEYS}, weights)


def _git_sha() -> str | None:
    return GIT_SHA.get("HEAD", _ask_git)


def _ask_git() -> str | None:
    root = Path(framework.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    import diffusers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "samplerlab": framework.__version__,
        "git_sha": _git_sha(),
    }


def build(run: Run, result: Result) -> dict[str, Any]:
    config = resolved_config(run.cfg)
    s = run.settings
    indices = s.indices()
    weights = weights_fingerprint(config)  # once: it lists the weight folders
    return {
        "schema_version": SCHEMA_VERSION,
        "run_key": run_key(config, weights),
        "merge_key": merge_key(config, weights),
        "config": config,
        "plugins": run.plugins.hook_map(),
        "sigmas": list(result.schedule.sigmas),
        "timesteps": None if result.schedule.timesteps is None else list(result.schedule.timesteps),
        "init_noise_scale": result.schedule.init_noise_scale,
        "metrics": dict(run.metrics),
        "seed": s.seed,
        "num_samples": s.num_samples,
        "shard": {"index": s.shard_index, "count": s.shard_count, "start": indices.start, "stop": indices.stop},
        "failed_samples": list(result.failed),
        "failures": {str(k): why for k, why in result.failures.items()},
        "resumed_samples": list(result.resumed),
        "images": None,
        "versions": versions(),
    }
