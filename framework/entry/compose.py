"""Composing the Hydra config outside a Hydra app (Python API, CLI pre-checks), and turning Hydra's
composition errors into one-line messages that name the fix."""
from __future__ import annotations

import re
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from framework.core.errors import ConfigError
from framework.core.registry import CONF_DIR, GROUPS, available, entry_point_confs


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


def explain(exc: BaseException) -> ConfigError:
    """A one-line ConfigError for a Hydra/OmegaConf composition error."""
    msg = str(exc)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", msg)
    if isinstance(exc, MissingConfigException) and m:
        group, name = m.group(1), m.group(2)
        options = ", ".join(available(group)) or "none"
        return ConfigError(f"unknown {group} '{name}': choose one of {options} (`samplerlab-plugins` lists them)")
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        head = key.split(".")[0]
        if head in GROUPS:
            return ConfigError(
                f"unknown key '{key}': select the plugin first (e.g. {head}=[{key.split('.')[1] if '.' in key else '...'}]) "
                f"or check the parameter name"
            )
        return ConfigError(f"unknown key '{key}': check the spelling (`samplerlab --cfg job` shows every key), or add it with +{key}=…")
    m = re.search(r"Could not load '([\w/]+)/([^']+)'", msg)
    if m:
        return ConfigError(f"unknown {m.group(1)} '{m.group(2)}': choose one of {', '.join(available(m.group(1))) or 'none'}")
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return ConfigError(f"invalid configuration: {first}")


def release() -> None:
    """Clear Hydra's global state (before a Hydra app starts in this process)."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


def compose(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The composed config (without the ``hydra`` node) and the choices of the single groups.

    Hydra's global state is saved and restored around the composition, so this works inside a
    Hydra app and leaves other users of ``hydra.initialize`` undisturbed.
    """
    register_resolvers()
    backup = get_gh_backup()
    release()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="samplerlab"):
            cfg = hydra_compose("config", overrides=searchpath_override() + list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise explain(e) from e
    finally:
        restore_gh_from_backup(backup)
    choices: dict[str, Any] = OmegaConf.to_container(cfg.hydra.runtime.choices)  # type: ignore[assignment]
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, {k: v for k, v in choices.items() if isinstance(v, str)}
