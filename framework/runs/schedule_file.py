"""Schedule files: σ grids computed for one model by ``samplerlab-optimize-schedule``
(:mod:`framework.tools.schedule_opt`), read by ``schedule=optimized``.

A schedule file is JSON::

    {"format": "samplerlab-schedule", "version": 1,
     "model": {"name": "bundled", "fingerprint": "…", "sigma_min": …, "sigma_max": …},
     "solver": "dpmpp_2m", "method": "gits", "calibration": {prompts, seed, num_samples},
     "settings": {…}, "grids": {"<NFE>": {"steps", "nfe", "sigmas", "objective", …}},
     "checksum": "<sha256 of the rest>"}

``model_fingerprint`` names the weights a grid was made for: the digest of the weights folder a
run reads (bundled model, ``model.path``) or, for a model without weight files (the analytic
models), of its configuration.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from framework.core.errors import ConfigError
from framework.core.files import atomic_write_json

FORMAT = "samplerlab-schedule"
VERSION = 1


def model_fingerprint(model_config: Any) -> str:
    """A 16-hex digest of the weights of the model a config node describes (its ``_target_`` and
    weight files; its whole node when it has no weight files)."""
    from framework.runs.records import weights_fingerprint

    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.to_container(model_config, resolve=True) if isinstance(model_config, DictConfig) else dict(model_config)
    target = str(node.get("_target_", ""))
    weights = weights_fingerprint({"model": node})
    if "model.path" in weights:
        basis: Any = {"target": target, "weights": weights["model.path"]}
    elif target.endswith(".Bundled") and "bundled" in weights:
        basis = {"target": target, "weights": weights["bundled"]}
    else:  # analytic models: their parameters are their weights
        basis = {"target": target, "config": node}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digest(content: dict[str, Any]) -> str:
    body = {k: v for k, v in content.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_schedule_file(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` (format, version and checksum added) atomically."""
    content = {"format": FORMAT, "version": VERSION, **{k: v for k, v in content.items() if k not in ("format", "version")}}
    content["checksum"] = _digest(content)
    atomic_write_json(Path(path), content)


def read_schedule_file(path: str | Path) -> dict[str, Any]:
    """The content of a schedule file, checked; a missing, unreadable or damaged file is one
    ConfigError line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"schedule file {p} not found: make one with samplerlab-optimize-schedule (docs/optimisation.md)")
    try:
        content = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"schedule file {p} is not readable JSON ({type(e).__name__}): remake it with samplerlab-optimize-schedule") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ConfigError(f"{p} is not a samplerlab schedule file (no format: {FORMAT})")
    if content.get("version") != VERSION:
        raise ConfigError(f"schedule file {p} has version {content.get('version')!r}; this samplerlab reads version {VERSION}")
    if content.get("checksum") != _digest(content):
        raise ConfigError(f"schedule file {p} is damaged (its checksum does not match): remake it with samplerlab-optimize-schedule")
    grids = content.get("grids")
    if not isinstance(grids, dict) or not isinstance(content.get("model"), dict):
        raise ConfigError(f"schedule file {p} lacks its grids or model")
    for key, g in grids.items():
        sig = g.get("sigmas") if isinstance(g, dict) else None
        if (not isinstance(sig, list) or len(sig) < 2 or not all(isinstance(s, (int, float)) for s in sig)
                or any(b >= a for a, b in zip(sig, sig[1:])) or sig[-1] < 0):
            raise ConfigError(f"schedule file {p}: grid for NFE {key} is not a strictly decreasing list of σ ≥ 0")
    return content
