"""Run records: ``record.json`` (schema_version, run key, resolved config, plugins, metrics, versions)
and the run folder's images, written atomically (temporary file, then rename)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

import framework

if TYPE_CHECKING:
    from framework.engine import Result, Run

SCHEMA_VERSION = 1
#: Keys that say where or how results are stored, not what is computed: left out of the run key.
NON_SEMANTIC_KEYS = ("output_dir", "save_images", "hydra")


def resolved_config(cfg: Any) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return {k: v for k, v in data.items() if k not in ("hydra",)}


def run_key(config: dict[str, Any]) -> str:
    """A short hash of the resolved config (without where-to-store keys): same config, same key."""
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}
    blob = json.dumps(semantic, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    return {
        "schema_version": SCHEMA_VERSION,
        "run_key": run_key(config),
        "config": config,
        "plugins": run.plugins.hook_map(),
        "sigmas": list(result.schedule.sigmas),
        "timesteps": None if result.schedule.timesteps is None else list(result.schedule.timesteps),
        "metrics": dict(run.metrics),
        "seed": run.settings.seed,
        "num_samples": run.settings.num_samples,
        "failed_samples": list(result.failed),
        "images": None,
        "versions": versions(),
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def save(folder: Path, result: Result, save_images: bool = True) -> None:
    """Write the run folder: samples/*.png and grid.png for image models, then record.json last."""
    from framework.images import grid, png_bytes

    folder = Path(folder)
    if save_images and result.images is not None:
        names = []
        for k, img in enumerate(result.images):
            name = f"samples/{k:06d}.png"
            atomic_write_bytes(folder / name, png_bytes(img))
            names.append(name)
        atomic_write_bytes(folder / "grid.png", png_bytes(grid(result.images)))
        result.record["images"] = {"samples": names, "grid": "grid.png"}
    atomic_write_json(folder / "record.json", result.record)
