"""The run record (``record.json``) and the run key.

The record holds ``schema_version``, the run key (a hash of the resolved config, of the weights it
reads and of the input files it names: reruns and resumed sweeps find their folders by it), the
resolved config, the plugins per hook, the σ grid, metrics, seed, shard, failures, versions, where
the images are, the digest of every file the run wrote (``files``) and the record's own digest
(``checksum``). The run folder that holds it: :mod:`framework.runs.folder`.

Schema versions (readers accept every one): 1, the first; 2 adds ``files`` (path in the folder →
digest), ``inputs`` (config key → digest of the file or folder it names) and ``checksum``.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import framework
from framework.core.memo import Memo
from framework.core.perturb import NFE_CONVENTION
from framework.core.run import Result, Run

SCHEMA_VERSION = 2
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


def digest(data: bytes) -> str:
    """The digest the run folder records for a file's bytes (sha256, 16 hex digits)."""
    return hashlib.sha256(data).hexdigest()[:16]


def file_digest(path: Path) -> str | None:
    """:func:`digest` of a file's bytes, or None when it cannot be read as a file."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()[:16]


def _record_digest(record: dict[str, Any]) -> str:
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != "checksum"}, default=str))
    return digest(json.dumps(body, sort_keys=True).encode())


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """Add the record's own digest (``checksum``, over every other field), checked when it is read back."""
    record["checksum"] = _record_digest(record)
    return record


#: The fields a reader of a run record relies on (every schema version has them), and of the
#: merged record ``samplerlab-score`` writes (``kind: merged``).
RECORD_FIELDS = ("schema_version", "run_key", "config", "sigmas", "timesteps", "num_samples", "failed_samples", "images")
MERGED_FIELDS = ("schema_version", "kind", "config", "metrics", "num_samples", "failed_samples", "images")


def read_record(path: Path) -> tuple[Any, str | None]:
    """(the record.json at ``path``, why it cannot be trusted or None); unreadable → (None, why)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__
    return record, record_problem(record)


def record_problem(record: Any) -> str | None:
    """Why a record read back cannot be trusted (not an object, a field missing, its checksum does
    not match), or None. Records of schema 1 carry no checksum: their fields are checked."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    missing = [k for k in (MERGED_FIELDS if record.get("kind") == "merged" else RECORD_FIELDS) if k not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    version = record["schema_version"]
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        return f"unknown schema_version {version!r}"
    if version >= 2 and record.get("checksum") != _record_digest(record):
        return "its checksum does not match its content"
    return None


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


#: Digests of input files and folders by (path, listing of names, sizes, mtimes), as :data:`FOLDER_HASHES`.
INPUT_HASHES: Memo[str] = Memo("input file hashes", 256)


def _plugin_nodes(node: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(dotted key, node) of every plugin node (a mapping with ``_target_``) in a config tree."""
    if not isinstance(node, dict):
        return []
    own = [(where, node)] if "_target_" in node else []
    return own + [n for k, v in node.items() for n in _plugin_nodes(v, f"{where}.{k}" if where else str(k))]


def _input_digest(value: str) -> str | None:
    """A file by its content, a folder by the content of the files below it (files over 64 MB by
    size and mtime, as weights); None when ``value`` names neither."""
    path = Path(value).expanduser().resolve()
    if path.is_file():
        root, files = path.parent, [path]
    elif path.is_dir():
        root, files = path, sorted(f for f in path.rglob("*") if f.is_file())
    else:
        return None
    listing = tuple((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return INPUT_HASHES.get((str(path), listing), lambda: _hash_files(str(root), listing))


def inputs_fingerprint(config: dict[str, Any]) -> dict[str, str]:
    """Digests of the input files a config names, by config key. A plugin class declares which of
    its parameters name files it reads (``input_files = ("image", "mask")``, a class attribute);
    each such value that names an existing file or folder enters the run key by content, so a
    rerun after an input image, mask or embedding changed is not answered from the old run folder.
    (``model.path`` is the weights': :func:`weights_fingerprint`.)"""
    from framework.core.errors import ConfigError
    from framework.core.registry import plugin_class

    out = {}
    for where, node in _plugin_nodes({k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}):
        try:
            declared = getattr(plugin_class(str(node["_target_"]), where), "input_files", ())
        except ConfigError:  # not a plugin class: building the run reports it
            continue
        for name in declared:
            head, _, field = name.partition(".")
            for key, value in _strings(node.get(head), f"{where}.{head}", field):
                try:
                    found = _input_digest(value) if value.strip() else None
                except (OSError, ValueError):  # unreadable: the plugin reports it when it reads the file
                    found = None
                if found is not None:
                    out[key] = found
    return out


def _strings(value: Any, key: str, field: str = "") -> list[tuple[str, str]]:
    """The file names in a declared input parameter, with their config keys: the value itself, or,
    for a declaration ``"regions.mask"``, the ``mask`` of every mapping in the list ``regions``
    (``guidance.regional.regions[1].mask``), so file names nested in lists count too."""
    if isinstance(value, str):
        return [] if field else [(key, value)]
    if isinstance(value, Mapping):
        return _strings(value[field], f"{key}.{field}") if field and field in value else []
    if isinstance(value, Sequence):
        return [pair for i, v in enumerate(value) for pair in _strings(v, f"{key}[{i}]", field)]
    return []


def run_key(config: dict[str, Any], weights: dict[str, str] | None = None, inputs: dict[str, str] | None = None) -> str:
    """A short hash of the resolved config (without where-to-store keys), of the weights it reads
    (:func:`weights_fingerprint`, or ``weights`` when the caller has it) and of the input files it
    names (:func:`inputs_fingerprint`, or ``inputs``): same config, weights and inputs, same key."""
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}
    semantic["weights"] = weights_fingerprint(config) if weights is None else weights
    inputs = inputs_fingerprint(config) if inputs is None else inputs
    if inputs:  # keys of configs that name no file are those of schema 1
        semantic["inputs"] = inputs
    blob = json.dumps(semantic, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def merge_key(config: dict[str, Any], weights: dict[str, str] | None = None, inputs: dict[str, str] | None = None) -> str:
    """The run key without the shard settings: every shard of one evaluation has the same."""
    return run_key({k: v for k, v in config.items() if k not in SHARD_KEYS}, weights, inputs)


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
    inputs = inputs_fingerprint(config)
    return {
        "schema_version": SCHEMA_VERSION,
        "run_key": run_key(config, weights, inputs),
        "merge_key": merge_key(config, weights, inputs),
        "config": config,
        "plugins": run.plugins.hook_map(),
        "sigmas": list(result.schedule.sigmas),
        "timesteps": None if result.schedule.timesteps is None else list(result.schedule.timesteps),
        "init_noise_scale": result.schedule.init_noise_scale,
        "metrics": dict(run.metrics),
        **({"compile": run.compile_report} if run.compile_report is not None else {}),
        "nfe_convention": NFE_CONVENTION,
        "seed": s.seed,
        "num_samples": s.num_samples,
        "shard": {"index": s.shard_index, "count": s.shard_count, "start": indices.start, "stop": indices.stop},
        "failed_samples": list(result.failed),
        "failures": {str(k): why for k, why in result.failures.items()},
        "resumed_samples": list(result.resumed),
        "images": None,
        "inputs": inputs,
        "files": {},
        "versions": versions(),
    }
