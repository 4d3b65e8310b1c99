"""Composing the Hydra config outside a Hydra app (Python API, CLI pre-checks), and turning Hydra's
composition errors into one-line messages that name the fix.

:func:`compose` remembers each composition (a named :class:`~framework.core.memo.Memo`, keyed by the
override list, ``sys.path`` and the entry-point switch) and returns a deep copy of it (≈ 1 ms): the
caller owns what it gets and may change it; the runs of one process compose each command once.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import sys
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from framework.core.errors import ConfigError
from framework.core.memo import Memo
from framework.core.registry import CONF_DIR, DISABLE_ENTRY_POINTS_ENV, GROUPS, SINGLE_GROUPS, available, entry_point_confs
from framework.core.settings import KEYS

#: A config choice is a plain name (a file name without folders): ``solver=heun``, not ``../solver/heun``.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: The top-level keys a composed config may hold: the settings and the plugin groups.
TOP_LEVEL = (*KEYS, *GROUPS)

COMPOSED: Memo[tuple[DictConfig, dict[str, str]]] = Memo("composed configs", 256)


def _folder(kind: str, default: str, *, _root_: DictConfig) -> str:
    """``samplerlab.folder``: the run (kind=run) or sweep (kind=sweep) folder below outputs/ or
    multirun/: ``name`` when set (plus shard-<i>-of-<n> for a sharded single run), else ``default``
    (the timestamp), so that a rerun of a named command finds the folder of the first."""
    name = _root_.get("name")
    if not name:
        return str(default)
    count = _root_.get("shard_count", 1)
    if kind == "run" and isinstance(count, int) and count > 1:
        return f"{name}/shard-{_root_.get('shard_index')}-of-{count}"
    return str(name)


def _job(default: str, *, _root_: DictConfig) -> str:
    """``samplerlab.job``: a sweep job's sub-folder — its run key when ``name`` is set (so reordered
    or extended sweeps still find their finished runs), else ``default`` (Hydra's job number)."""
    if not _root_.get("name"):
        return str(default)
    from framework.runs.records import resolved_config, run_key

    job = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])
    return run_key(resolved_config(job))


def register_resolvers() -> None:
    """Register the resolvers that conf/config.yaml's ``hydra.run``/``hydra.sweep`` folders use."""
    for name, fn in (("samplerlab.folder", _folder), ("samplerlab.job", _job)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def searchpath_override() -> list[str]:
    """``hydra.searchpath=[...]`` for the config folders of entry-point plugin distributions."""
    paths = [f"file://{ext.path}" for ext in entry_point_confs() if ext.path.is_dir()]
    return [f"hydra.searchpath=[{','.join(paths)}]"] if paths else []


def _did_you_mean(close: list[str]) -> str:
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _group_parameters(group: str) -> dict[str, list[str]]:
    """Each option of ``group`` → its parameter names, read from the YAML files (no imports)."""
    import yaml

    roots = [CONF_DIR, *(ext.path for ext in entry_point_confs())]
    out: dict[str, list[str]] = {}
    for root in roots:
        for path in sorted((root / group).glob("*.yaml")):
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            out.setdefault(path.stem, [k for k in data if isinstance(data, dict) and k != "_target_"])
    return out


def unknown_key(key: str, overrides: list[str]) -> str:
    """The message for a key the config does not have: the closest keys by spelling, or the plugin
    that has it (``solver.etaa`` → "did you mean solver.eta?"; ``stepz`` → "did you mean steps?")."""
    head, _, rest = key.partition(".")
    if head not in GROUPS or not rest:
        close = difflib.get_close_matches(key, TOP_LEVEL, n=2, cutoff=0.6)
        return (f"unknown key '{key}': no setting or plugin reads it{_did_you_mean(close)} "
                "(`samplerlab --help` lists the settings and plugin groups)")
    try:  # what the rest of the command line selects
        cfg, choices = compose([o for o in overrides if _key_of(o) != key])
    except ConfigError:  # the rest has a mistake of its own: no plugin to compare with
        return f"unknown key '{key}': check its spelling (`samplerlab-plugins` lists each plugin's options)"
    node = cfg.get(head)
    presets = _group_parameters(head)
    if head in SINGLE_GROUPS:
        name, param = choices.get(head, "?"), rest
        where, prefix = f"{head}={name}", head
        params = [str(k) for k in node if k != "_target_"] if isinstance(node, DictConfig) else []
    else:
        plugin, _, param = rest.partition(".")
        selected = [str(k) for k in node] if isinstance(node, DictConfig) else []
        if plugin not in selected:
            listing = ",".join([*selected, plugin])
            if plugin in presets:
                return f"unknown key '{key}': select the plugin first, e.g. {head}=[{listing}] {key}=…"
            close = [f"{head}.{c}" for c in difflib.get_close_matches(plugin, selected or list(presets), n=2, cutoff=0.6)]
            return (f"unknown key '{key}': no {head} plugin '{plugin}' is selected{_did_you_mean(close)} "
                    f"(selected: {', '.join(selected) or 'none'}; `samplerlab-plugins` lists them)")
        where, prefix = f"{head}.{plugin}", f"{head}.{plugin}"
        params = [str(k) for k in node[plugin] if k != "_target_"]
    if not param:
        return f"unknown key '{key}': give a parameter of {where} ({', '.join(params) or 'it has none'})"
    takes = f"{where} takes: {', '.join(params) or 'no parameters'}"
    close = difflib.get_close_matches(param, params, n=2, cutoff=0.6)
    if close:
        return f"unknown key '{key}': did you mean {' or '.join(f'{prefix}.{c}' for c in close)}? ({takes})"
    owners = [n for n, ps in presets.items() if param in ps]
    elsewhere = f"; '{param}' is a parameter of {head}={', '.join(owners)}" if owners else ""
    return f"unknown key '{key}': {takes}{elsewhere}"


def explain(exc: BaseException, overrides: list[str] | None = None) -> ConfigError:
    """A one-line ConfigError for a Hydra/OmegaConf composition error (``overrides``, when given,
    let an unknown key be matched against the keys of the plugins they select)."""
    msg = str(exc)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", msg)
    if isinstance(exc, MissingConfigException) and m:
        group, name = m.group(1), m.group(2)
        options = ", ".join(available(group)) or "none"
        close = difflib.get_close_matches(name, list(available(group)), n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'{group}={c}' for c in close)}? " if close else ""
        return ConfigError(f"unknown {group} '{name}': {hint}choose one of {options} (`samplerlab-plugins` lists them)")
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        return ConfigError(unknown_key(m.group(1), list(overrides or [])))
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:
        return ConfigError(f"'{m.group(1)}' is a sweep: add -m to run every value (samplerlab -m {m.group(1)}), "
                           "or quote a value that holds a comma inside brackets: 'key=[a,b]'")
    m = re.search(r"Could not load '([\w/]+)/([^']+)'", msg)
    if m:
        return ConfigError(f"unknown {m.group(1)} '{m.group(2)}': choose one of {', '.join(available(m.group(1))) or 'none'}")
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return ConfigError(f"invalid configuration: {first}")


def _leaves(value: Any) -> list[Any]:
    """The plain values inside an override's value (lists, sweeps of lists)."""
    items = getattr(value, "list", None)
    if isinstance(value, (list, tuple)) or items is not None:
        return [x for v in (value if items is None else items) for x in _leaves(v)]
    return [value]


def check_plugin_names(overrides: list[str]) -> None:
    """Refuse a group choice that is not a plain name (``schedule=/etc/passwd``, ``model=../config``,
    ``solver=../solver/heun``): Hydra would read it as a path into the config tree."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    suspects = [o for o in overrides if _key_of(o) in GROUPS]
    if not suspects:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(suspects)
    except HydraException as e:
        raise explain(e) from e
    for ov in parsed:
        if ov.is_delete():
            continue
        for v in _leaves(ov.value()):
            if v is not None and not PLAIN_NAME.match(str(v)):
                group = ov.key_or_group
                raise ConfigError(f"{group} '{v}' is not a plugin name (plain names only, no folders): "
                                  f"choose one of {', '.join(available(group)) or 'none'}")


def check_top_level(cfg: DictConfig) -> None:
    """Refuse a top-level key that no setting or plugin group reads (e.g. ``+stepz=10``)."""
    for key in cfg:
        if key not in TOP_LEVEL and key != "hydra":
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=2, cutoff=0.6)
            raise ConfigError(f"unknown key '{key}': no setting or plugin reads it{_did_you_mean(close)} "
                              "(`samplerlab --help` lists the settings and plugin groups)")


def release() -> None:
    """Clear Hydra's global state (before a Hydra app starts in this process)."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


def _compose(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    check_plugin_names(overrides)
    register_resolvers()
    backup = get_gh_backup()
    release()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="samplerlab"):
            cfg = hydra_compose("config", overrides=searchpath_override() + overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise explain(e, overrides) from e
    finally:
        restore_gh_from_backup(backup)
    choices: dict[str, Any] = OmegaConf.to_container(cfg.hydra.runtime.choices)  # type: ignore[assignment]
    with open_dict(cfg):
        del cfg["hydra"]
    check_top_level(cfg)
    return cfg, {k: v for k, v in choices.items() if isinstance(v, str)}


def compose(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The composed config (without the ``hydra`` node) and the choices of the single groups.

    Hydra's global state is saved and restored around the composition, so this works inside a
    Hydra app and leaves other users of ``hydra.initialize`` undisturbed. Each override list is
    composed once per process (:data:`COMPOSED`); the config returned is the caller's own copy.
    """
    overrides = list(overrides)
    key = (tuple(overrides), tuple(sys.path), os.environ.get(DISABLE_ENTRY_POINTS_ENV, ""))
    cfg, choices = COMPOSED.get(key, lambda: _compose(overrides))
    return copy.deepcopy(cfg), dict(choices)
