"""``samplerlab --help`` and ``samplerlab-plugins``: what samplerlab offers, read from conf/ and the
plugins' source files, without importing torch or any plugin (both answer in a fraction of a second).
"""
from __future__ import annotations

import ast
import importlib.util
import re
import textwrap
from pathlib import Path
from typing import Any

import yaml

from framework.core.registry import CONF_DIR, GROUPS, LIST_GROUPS, ExternalConf, available, entry_point_confs

#: (command, what it shows): the examples of ``samplerlab --help`` (tests/entry/test_first_hour.py checks
#: that each composes).
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("samplerlab", "the bundled model: 4 images, 20 Euler steps on Karras σ, CFG 5"),
    ("samplerlab model=gaussian solver=heun steps=10", "an analytic model: the exact error is in the record"),
    ("samplerlab solver=dpmpp_2m steps=12 cfg_scale=7.5", "another solver, fewer steps, stronger guidance"),
    ("samplerlab solver=ddim solver.eta=1.0 schedule=uniform", "a plugin's parameter: group.key=value"),
    ("samplerlab guidance=[cfg,color_loss] cfg_scale=7.5", "a list group: plugins apply in the order written"),
    ("samplerlab momentum=[heavy_ball] momentum.heavy_ball.beta=0.3", "a list plugin's parameter: group.name.key=value"),
    ("samplerlab 'prompts=[a red circle,a blue square]' num_samples=8", "quote a value with spaces or commas"),
    ("samplerlab metrics=[fid,clip_score] num_samples=64 batch_size=16", "scored on the bundled world"),
    ("samplerlab solver=heun num_samples=256 name=heun_study", "a fixed folder, outputs/heun_study: rerun to resume"),
    ("samplerlab -m solver=euler,heun steps=5,10,20", "a sweep: every combination, one folder per run"),
    ("samplerlab model=sd15 model.path=/path/to/diffusers/folder", "a real checkpoint (offline: a local folder)"),
    ("samplerlab --cfg job solver=heun", "print the composed config; run nothing"),
)


def _defaults() -> dict[str, Any]:
    """The group choices of conf/config.yaml's defaults list."""
    data = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    out: dict[str, Any] = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            out.update(entry)
    return out


def _settings_lines() -> list[str]:
    """The top-level settings of conf/config.yaml with their comments, as written there."""
    lines, inside = [], False
    for line in (CONF_DIR / "config.yaml").read_text().splitlines():
        if re.match(r"^steps:", line):
            inside = True
        if inside and (not line.strip() or not (line[0].isalpha() or line.startswith(" "))):
            break
        if inside:
            lines.append("  " + line.rstrip())
    return lines


def _wrap(prefix: str, words: list[str], width: int = 100) -> str:
    return textwrap.fill(" ".join(words), width=width, initial_indent=prefix, subsequent_indent=" " * 4)


def help_text() -> str:
    """The page ``samplerlab --help`` prints."""
    defaults = _defaults()
    groups = []
    for group in GROUPS:
        default = defaults.get(group)
        chosen = set(default if isinstance(default, list) else [default])
        names = [f"{n}*" if n in chosen else n for n in available(group)]
        shown = f"[{','.join(default)}]" if isinstance(default, list) else str(default)
        kind = "list" if group in LIST_GROUPS else "one "
        groups.append(_wrap(f"  {group:<13}{kind} (default {shown}): ", names))
    width = max(len(c) for c, _ in EXAMPLES) + 2
    examples = [f"  {c:<{width}}# {d}" for c, d in EXAMPLES]
    return "\n".join([
        "samplerlab: sample a latent diffusion model with a sampler composed from plugins (a noise",
        "schedule, a solver, momentum/history methods, guidance, callbacks, metrics), and record the run.",
        "",
        "usage: samplerlab [key=value ...]            one run",
        "       samplerlab -m [key=a,b ...]           a sweep (multirun): every combination of the values",
        "",
        "Plugin groups (* = default). 'one' groups take one name: solver=heun. 'list' groups take a list",
        "in brackets, applied in the order written: guidance=[cfg,color_loss]; an empty list turns the",
        "group off: callback=[]. Parameters: solver.eta=1.0 (one-plugin groups),",
        "momentum.heavy_ball.beta=0.3 (list groups: group.name.key).",
        *groups,
        "",
        "Settings (key=value; defaults and comments from conf/config.yaml):",
        *_settings_lines(),
        "",
        "Examples:",
        *examples,
        "",
        "Values: lists in brackets, 'prompts=[a red circle,a blue square]' (quote spaces for the shell);",
        "a comma outside brackets is a sweep (with -m): steps=5,10,20; a sweep over lists:",
        "'momentum=[heavy_ball],[multistep]'. A key that is not in the config is an error (a typo).",
        "",
        "Outputs: each run writes outputs/<date>/<time>/ (outputs/<name>/ with name=...): record.json",
        "(config, σ grid, metrics, versions), samples/*.png, grid.png, samplerlab.log. A sweep writes",
        "multirun/<date>/<time>/<job>/ (multirun/<name>/<run key>/ with name=...); samplerlab-report",
        "<sweep folder> builds its HTML report. Rerunning a named command resumes it.",
        "",
        "More: samplerlab-plugins (every plugin, its description and options with defaults),",
        "samplerlab --cfg job [overrides] (the composed config), samplerlab --hydra-help (Hydra's flags:",
        "launchers, sweepers), README.md and docs/ (architecture.md, solvers.md, guidance.md, report.md).",
    ])


def _module_file(module: str, roots: list[Path]) -> Path | None:
    """The source file of ``module`` found without importing it (nor its package)."""
    rel = Path(*module.split("."))
    for root in roots:
        for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
            if candidate.is_file():
                return candidate
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def description(target: str, roots: list[Path]) -> str:
    """The first line of the module docstring of the class ``target`` names (else of the class's)."""
    module, _, cls = str(target).rpartition(".")
    path = _module_file(module, roots)
    if path is None:
        return "(source not found)"
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or next(
        (ast.get_docstring(n) for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if not doc:
        return "(no description)"
    first = doc.strip().splitlines()[0].rstrip()
    return first if first.endswith((".", ":", ")", "!", "?")) else first + " …"


def _conf_file(group: str, name: str, externals: list[ExternalConf]) -> Path | None:
    for root in (CONF_DIR, *(ext.path for ext in externals)):
        if (root / group / f"{name}.yaml").is_file():
            return root / group / f"{name}.yaml"
    return None


def _value(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else f"'{v}'" if v == "" else str(v)


def plugin_listing() -> str:
    """What ``samplerlab-plugins`` prints: per group, each plugin with its source, description and
    options (the preset's values: what ``group=name`` selects)."""
    externals = entry_point_confs()
    roots = [CONF_DIR.parent, *(ext.path.parent.parent for ext in externals)]
    out = ["Every plugin per group: its name, where it comes from (builtin, or the distribution that",
           "installed it), the first line of its module's docstring, and below it the options with the",
           "defaults its preset sets (change one with group.key=value, or group.name.key=value in list",
           "groups).", ""]
    indent = " " * 32
    for group in GROUPS:
        options = available(group)
        out.append(f"{group} ({'a list: ' + group + '=[a,b]' if group in LIST_GROUPS else 'one: ' + group + '=name'}):")
        for name, source in options.items():
            path = _conf_file(group, name, externals)
            data = (yaml.safe_load(path.read_text()) or {}) if path is not None else {}
            target = data.pop("_target_", "")
            data.pop("defaults", None)  # Hydra's defaults list (a model choosing its schedule), not an option
            out.append(f"  {name:<20} {source:<8} {description(target, roots) if target else '(no _target_)'}")
            params = ", ".join(f"{k}={_value(v)}" for k, v in data.items())
            out.append(textwrap.fill(params or "(no options)", width=100, initial_indent=indent, subsequent_indent=indent))
        if not options:
            out.append("  (none)")
    if externals:
        out.append("entry-point distributions: " + ", ".join(f"{x.distribution} ({x.entry_point})" for x in externals))
    return "\n".join(out)
