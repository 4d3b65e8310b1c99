"""``samplerlab-score <folder> [<folder> ...] [overrides]``: score the saved samples of one or many
run folders — typically the shards of one large evaluation — with the metrics plugins, and write a
merged record.

Each folder is a run folder (``record.json`` and ``samples/{k:06d}.png``, ``k`` the global sample
index). Only the samples its record lists are read, each checked against the digest the record
holds (schema 2; schema-1 PNGs must decode): a missing or damaged one is left out with a one-line
warning and listed in ``damaged_samples``; a damaged record is a one-line error. Samples are merged by index (the first folder holding an index wins, so overlapping shards
count once) and fed to the metrics plugins in index order through their ordinary hooks
(``configure``, ``run_start``, ``batch_end``, ``run_end``), exactly as during sampling: sample
``k``'s prompt is ``prompts[k % len(prompts)]`` of the records' config. The metrics are the
overrides' (``metrics=[fid,clip_score] metrics.fid.reference=1024``) or, without overrides, those
the runs were configured with. The merged record (``record.json``, ``kind: merged``) and a grid of
the first samples go to ``--out`` (default: ``<parent of the first folder>/merged``); it lists the
source folders, the missing and failed indices, and the shards' mean NFE and summed seconds.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from framework.core.errors import ConfigError, SamplerlabError
from framework.core.state import Stash

#: Config keys that differ between the shards of one evaluation (or say where results go).
SHARD_KEYS = ("shard_index", "shard_count", "output_dir", "save_images", "name", "resume")
HOOKS = ("configure", "run_start", "batch_end", "run_end")


@dataclass
class Source:
    """One run folder: its record and its samples by global index."""

    folder: Path
    record: dict[str, Any]
    samples: dict[int, Path]
    damaged: list[int] = field(default_factory=list)


_SAMPLE = re.compile(r"^samples/(\d{6,})\.png$")


def _sound(path: Path, want: str | None) -> bool:
    """Whether a listed sample file is intact: its digest (schema 2), or that it decodes (schema 1)."""
    from framework.runs.records import file_digest

    if want is not None:
        return file_digest(path) == want
    try:
        _load_png(path)
        return True
    except Exception:
        return False


def read_source(folder: str | Path) -> Source:
    """A run folder's record and the sample files it lists, each checked (see the module docstring)."""
    from framework.runs.records import read_record

    folder = Path(folder)
    path = folder / "record.json"
    if not (path.exists() or path.is_symlink()):
        raise ConfigError(f"{folder} has no record.json: give run folders (each shard's output folder)")
    record, problem = read_record(path)
    if problem is not None:
        raise ConfigError(f"{path} is damaged ({problem}): rerun that run's command to make it again")
    files = record.get("files")
    samples, damaged = {}, []
    for rel in (record.get("images") or {}).get("samples") or []:
        m = _SAMPLE.match(str(rel))
        if m is None:
            continue
        k = int(m.group(1))
        if _sound(folder / rel, None if files is None else files.get(rel, "")):
            samples[k] = folder / rel
        else:
            damaged.append(k)
            warnings.warn(f"{folder / rel} is missing or damaged: left out of the scores (rerun that run's command to "
                          "repair it)", stacklevel=2)
    return Source(folder, record, samples, damaged)


def _comparable(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in SHARD_KEYS}, sort_keys=True, default=str)


def check_same_evaluation(sources: Sequence[Source]) -> None:
    """All folders must come from one evaluation (equal config up to the shard and storage keys)."""
    first = sources[0]
    for s in sources[1:]:
        a, b = first.record.get("merge_key"), s.record.get("merge_key")
        same = a == b if a and b else _comparable(first.record.get("config", {})) == _comparable(s.record.get("config", {}))
        if not same:
            raise ConfigError(f"{s.folder} and {first.folder} come from different configurations: "
                              "score the shards of one evaluation together (or score them separately)")


@dataclass
class _Settings:
    num_samples: int
    seed: int
    prompts: list[str]
    batch_size: int


@dataclass
class _Model:
    is_conditional: bool
    has_decoder: bool = True


@dataclass
class ScoringRun:
    """What the metrics plugins read from a run, for scoring saved images."""

    cfg: Any
    settings: _Settings
    model: _Model
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metrics: dict[str, float] = field(default_factory=dict)
    output_dir: Path | None = None
    stash: Stash = field(default_factory=Stash)


def metric_plugins(overrides: list[str], config: dict[str, Any]) -> list[tuple[str, object]]:
    """(name, plugin) in config order: from the overrides when given, else the runs' own metrics."""
    from omegaconf import OmegaConf

    from framework.entry.compose import compose
    from framework.core.registry import instantiate

    node = compose(overrides)[0].metrics if overrides else OmegaConf.create(config.get("metrics") or {})
    plugins = [(str(name), instantiate(node[name], f"metrics.{name}")) for name in node]
    if not plugins:
        raise ConfigError("no metrics to score: give some, e.g. samplerlab-score <folders> metrics=[fid,clip_score]")
    return plugins


def _load_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


def score(folders: Sequence[str | Path], overrides: Sequence[str] = (), out: str | Path | None = None,
          batch_size: int = 64) -> dict[str, Any]:
    """Merge the samples of ``folders`` by index, score them, write and return the merged record."""
    from framework.core.errors import call
    from framework.runs.images import grid, png_bytes
    from framework.core.files import atomic_write_bytes, atomic_write_json
    from framework.runs.records import SCHEMA_VERSION, digest, seal, versions
    from framework.core.state import Batch, Conditioning

    if not folders:
        raise ConfigError("give at least one run folder: samplerlab-score <folder> [<folder> ...] [metrics=[fid]]")
    sources = [read_source(f) for f in folders]
    check_same_evaluation(sources)
    config = {k: v for k, v in sources[0].record.get("config", {}).items() if k not in ("shard_index", "shard_count")}
    samples: dict[int, Path] = {}
    owner: dict[int, int] = {}
    for i, s in enumerate(sources):
        for k, p in s.samples.items():
            if k not in samples:
                samples[k], owner[k] = p, i
    if len(samples) < 1:
        raise ConfigError(f"no intact samples listed in the records of {', '.join(str(s.folder) for s in sources)}: "
                          "run with save_images=true (or rerun to repair them)")
    indices = sorted(samples)
    prompts = list(config.get("prompts") or [])
    expected = int(config.get("num_samples") or len(indices))
    run = ScoringRun(cfg=config, settings=_Settings(len(indices), int(config.get("seed", 0)), prompts, batch_size),
                     model=_Model(is_conditional=bool(prompts)))
    plugins = metric_plugins(list(overrides), config)
    hooks = {h: [(n, getattr(p, h)) for n, p in plugins if callable(getattr(p, h, None))] for h in HOOKS}
    for name, fn in hooks["configure"]:
        call(name, "configure", fn, run=run)
    for name, fn in hooks["run_start"]:
        call(name, "run_start", fn, run=run)
    for start in range(0, len(indices), batch_size):
        ks = indices[start:start + batch_size]
        images = torch.stack([_load_png(samples[k]) for k in ks])
        cond = Conditioning(prompts=[prompts[k % len(prompts)] for k in ks], tensors={}) if prompts else None
        batch = Batch(indices=ks, cond=cond, noise=None)
        for name, fn in hooks["batch_end"]:
            call(name, "batch_end", fn, run=run, batch=batch, latents=None, images=images)
    for name, fn in hooks["run_end"]:
        call(name, "run_end", fn, run=run, result=None)

    shard_metrics = [s.record.get("metrics", {}) for s in sources]
    merged: dict[str, float] = {}
    for key, how in (("nfe", "mean"), ("unet_calls", "mean"), ("seconds", "sum")):
        values = [float(m[key]) for m in shard_metrics if key in m]
        if values:
            merged[key] = sum(values) / (len(values) if how == "mean" else 1)
    merged.update(run.metrics)
    out_dir = Path(out) if out else sources[0].folder.parent / "merged"
    first = [_load_png(samples[k]) for k in indices[:16]]
    grid_png = png_bytes(grid(torch.stack(first)))
    atomic_write_bytes(out_dir / "grid.png", grid_png)
    failed = sorted({int(k) for s in sources for k in s.record.get("failed_samples", [])})
    damaged = sorted({k for s in sources for k in s.damaged} - set(indices))
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": "merged",
        "merge_key": sources[0].record.get("merge_key"),
        "config": config,
        "plugins": sources[0].record.get("plugins", {}),
        "metrics": merged,
        "seed": run.settings.seed,
        "num_samples": len(indices),
        "missing_samples": sorted(set(range(expected)) - set(indices) - set(failed)),
        "failed_samples": failed,
        "damaged_samples": damaged,
        "scored_with": [n for n, _ in plugins],
        "sources": [{"folder": str(s.folder.resolve()), "run_key": s.record.get("run_key"), "shard": s.record.get("shard"),
                     "samples": sum(1 for i_ in owner.values() if i_ == i)} for i, s in enumerate(sources)],
        "images": {"grid": "grid.png", "samples": [str(samples[k].resolve()) for k in indices]},
        "files": {"grid.png": digest(grid_png)},
        "versions": versions(),
    }
    atomic_write_json(out_dir / "record.json", seal(record))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``samplerlab-score <folder> [<folder> ...] [overrides] [--out DIR] [--batch-size N]``."""
    parser = argparse.ArgumentParser(prog="samplerlab-score", description="Score (and merge) the samples of run folders.")
    parser.add_argument("items", nargs="+", help="run folders, then Hydra overrides of the metrics (key=value)")
    parser.add_argument("--out", help="folder for the merged record (default: <parent of the first folder>/merged)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = [a for a in args.items if "=" in a]
    folders = [a for a in args.items if "=" not in a]
    from framework.entry.quiet import quiet_libraries

    try:
        with quiet_libraries():
            record = score(folders, overrides, args.out, args.batch_size)
    except SamplerlabError as e:
        print(f"samplerlab-score: error: {e}", file=sys.stderr)
        return 2
    scores = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
    missing = f", {len(record['missing_samples'])} missing" if record["missing_samples"] else ""
    missing += f" ({len(record['damaged_samples'])} damaged)" if record["damaged_samples"] else ""
    out = Path(args.out) if args.out else Path(folders[0]).parent / "merged"
    print(f"samplerlab-score: {record['num_samples']} samples from {len(folders)} folder(s){missing}: {scores} -> {out}")
    return 0


def run() -> None:  # console-script shim
    raise SystemExit(main())
