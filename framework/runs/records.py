"""Run records and the run folder, every file written atomically (temporary file, then rename).

A run folder holds ``samples/{k:06d}.png`` (k = the global sample index), ``batches/{first:06d}.safetensors``
(per batch: ``x_T`` and ``latents``, and in the metadata key ``samplerlab`` a JSON object with the
run key, indices, failures and NFE — what a resumed run reads back), ``grid.png`` and, written last, ``record.json`` (schema_version,
run key, resolved config, plugins, metrics, versions). A folder with a record.json is finished.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

import framework
from framework.core.files import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from framework.core.engine import Result, Run

SCHEMA_VERSION = 1
#: Keys that say where or how results are stored, or how fast they are computed (compile, memory
#: layout: the same samples within float rounding), not what is computed: left out of the run key.
NON_SEMANTIC_KEYS = ("output_dir", "save_images", "hydra", "name", "resume", "objective", "compile", "compile_mode",
                     "channels_last")
#: Keys that split one evaluation over processes: left out of the merge key (shards share it).
SHARD_KEYS = ("shard_index", "shard_count")
BATCH_DIR = "batches"


def resolved_config(cfg: Any) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return {k: v for k, v in data.items() if k not in ("hydra",)}


@functools.lru_cache(maxsize=32)
def _folder_hash(folder: str, listing: tuple) -> str:
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


def sample_name(k: int) -> str:
    """Where global sample ``k``'s image lives in a run folder."""
    return f"samples/{k:06d}.png"


@functools.cache
def _git_sha() -> str | None:
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


def save(folder: Path, result: Result, save_images: bool = True, samples_written: bool = False) -> None:
    """Write the run folder: samples/{k:06d}.png (k global; failed samples have none) and grid.png
    for image models, then record.json last. ``samples_written``: the PNGs were saved per batch."""
    from framework.runs.images import grid, png_bytes

    folder = Path(folder)
    if save_images and result.images is not None:
        indices = result.indices or list(range(len(result.images)))
        failed = set(result.failed)
        names = [sample_name(k) for k in indices if k not in failed]
        if not samples_written:
            for k, img in zip(indices, result.images):
                if k not in failed:
                    atomic_write_bytes(folder / sample_name(k), png_bytes(img))
        atomic_write_bytes(folder / "grid.png", png_bytes(grid(result.images)))
        result.record["images"] = {"samples": names, "grid": "grid.png"}
    atomic_write_json(folder / "record.json", result.record)


@dataclass
class SavedBatch:
    """A batch read back from ``batches/{first:06d}.safetensors``."""

    x_T: torch.Tensor
    latents: torch.Tensor
    failures: dict[int, str]
    nfe: int
    unet_calls: int


def batch_path(folder: Path, indices: list[int]) -> Path:
    return Path(folder) / BATCH_DIR / f"{indices[0]:06d}.safetensors"


def save_samples(folder: Path, indices: list[int], images: torch.Tensor, failures: dict[int, str],
                 only_missing: bool = False) -> None:
    """Write samples/{k:06d}.png for the finite samples of a batch (``only_missing``: keep existing files)."""
    from framework.runs.images import png_bytes

    for k, img in zip(indices, images):
        path = Path(folder) / sample_name(k)
        if k not in failures and not (only_missing and path.exists()):
            atomic_write_bytes(path, png_bytes(img))


def save_batch(
    folder: Path, key: str, indices: list[int], x_T: torch.Tensor, latents: torch.Tensor,
    images: torch.Tensor | None, failures: dict[int, str], nfe: int, unet_calls: int,
) -> None:
    """Save one finished batch: the PNGs of its finite samples, then its latents file (the batch's
    'done' mark, so a batch interrupted half-way is redone whole)."""
    from safetensors.torch import save as st_save

    if images is not None:
        save_samples(folder, indices, images, failures)
    info = {"run_key": key, "indices": indices, "nfe": nfe, "unet_calls": unet_calls,
            "failures": {str(k): why for k, why in failures.items()}}
    meta = {"samplerlab": json.dumps(info, sort_keys=True)}  # one key: safetensors orders keys at random
    tensors = {"x_T": x_T.detach().cpu().contiguous(), "latents": latents.detach().cpu().contiguous()}
    atomic_write_bytes(batch_path(folder, indices), st_save(tensors, metadata=meta))


def _batch_info(f: Any) -> dict[str, Any]:
    return json.loads((f.metadata() or {}).get("samplerlab", "{}"))


def load_batch(folder: Path, key: str, indices: list[int]) -> SavedBatch | None:
    """The saved batch of ``indices`` made under run key ``key``, or None (absent, other run, damaged)."""
    from safetensors import safe_open

    path = batch_path(folder, indices)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            info = _batch_info(f)
            if info.get("run_key") != key or info.get("indices") != indices:
                return None
            x_T, latents = f.get_tensor("x_T"), f.get_tensor("latents")
        failures = {int(k): why for k, why in info["failures"].items()}
        return SavedBatch(x_T, latents, failures, int(info["nfe"]), int(info["unet_calls"]))
    except Exception as e:  # damaged: make the batch again
        warnings.warn(f"ignoring unreadable {path} ({type(e).__name__}: {e}); the batch is made again", stacklevel=2)
        return None


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed process left behind (atomic writes never leave others)."""
    for sub in (Path(folder), Path(folder) / "samples", Path(folder) / BATCH_DIR):
        for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
            with contextlib.suppress(OSError):
                tmp.unlink()


def load_finished(folder: Path, key: str) -> Result | None:
    """The finished run in ``folder`` (record.json with run key ``key`` and all its batches), or None.

    Its images are read back from the PNGs (8-bit); failed samples, which have none, are NaN.
    """
    import numpy as np
    from PIL import Image

    from framework.core.engine import Result
    from framework.core.state import Schedule

    path = Path(folder) / "record.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("run_key") != key:
        warnings.warn(f"{folder} holds another run (run key {rec.get('run_key')}, not {key}): its files are overwritten",
                      stacklevel=2)
        return None
    shard = rec.get("shard") or {"start": 0, "stop": rec.get("num_samples", 0)}
    indices = list(range(shard["start"], shard["stop"]))
    saved, covered = [], []
    for p in sorted((Path(folder) / BATCH_DIR).glob("*.safetensors")):
        from safetensors import safe_open

        with contextlib.suppress(Exception), safe_open(str(p), framework="pt") as f:
            ks = _batch_info(f).get("indices", [])
            b = load_batch(folder, key, ks)
            if b is not None:
                saved.append(b)
                covered += ks
    if covered != indices:
        return None
    images = None
    if rec.get("images"):
        failed = set(rec.get("failed_samples", []))
        try:
            pics = {k: torch.from_numpy(np.array(Image.open(Path(folder) / sample_name(k)).convert("RGB"))).permute(2, 0, 1)
                    for k in indices if k not in failed}
        except OSError:  # a PNG was removed or damaged: the run is made again (its batches are read back)
            return None
        if pics:
            like = next(iter(pics.values()))
            nan = torch.full(like.shape, float("nan"))
            images = torch.stack([pics[k].float() / 255 if k in pics else nan for k in indices])
    schedule = Schedule(tuple(rec["sigmas"]), None if rec["timesteps"] is None else tuple(rec["timesteps"]),
                        rec.get("init_noise_scale"))
    return Result(
        x_T=torch.cat([b.x_T for b in saved]), latents=torch.cat([b.latents for b in saved]), images=images,
        record=rec, schedule=schedule, failed=list(rec.get("failed_samples", [])), indices=indices,
        resumed=indices, skipped=True, failures={int(k): v for k, v in rec.get("failures", {}).items()},
    )
