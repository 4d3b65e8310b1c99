"""The plugin manager built from a composed config, entry-point plugins, and role checks.

Hydra chooses and configures a plugin (``_target_`` plus parameters); pluggy dispatches its hooks.
Third-party distributions contribute config folders through the entry-point group ``samplerlab``:
the entry point names a Python package whose folder holds ``conf/<group>/<name>.yaml`` files.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pluggy
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from framework.core.errors import ConfigError
from framework.core.markers import PROJECT
from framework.core.memo import Memo
from framework.core.settings import schema

#: Config groups in the order their plugins are registered and their hooks called.
SINGLE_GROUPS = ("model", "schedule", "solver")
LIST_GROUPS = ("conditioning", "momentum", "guidance", "callback", "metrics", "logger")
GROUPS = SINGLE_GROUPS + LIST_GROUPS
#: Hooks answered by exactly one plugin.
EXCLUSIVE_HOOKS = ("schedule", "predict", "step")
#: Hooks answered by at most one plugin (the engine has a default).
OPTIONAL_EXCLUSIVE_HOOKS = ("init_latents",)
#: The group of the built-in plugins the entry points register (progress, exact error): they run
#: before the configured plugins and are not listed in the record's ``plugins``.
BUILTIN = "builtin"
ENTRY_POINT_GROUP = "samplerlab"
DISABLE_ENTRY_POINTS_ENV = "SAMPLERLAB_DISABLE_ENTRY_POINTS"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class PluginEntry:
    """One configured plugin: its name (config choice or list key), group and object."""

    name: str
    group: str
    obj: object


@dataclass(frozen=True)
class ExternalConf:
    """A config folder contributed by an installed distribution through the entry-point group."""

    distribution: str
    entry_point: str
    path: Path


def entry_point_confs() -> list[ExternalConf]:
    """Config folders of installed plugin distributions (none when disabled by the environment)."""
    if os.environ.get(DISABLE_ENTRY_POINTS_ENV, "").strip() not in ("", "0"):
        return []
    found = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            module = importlib.import_module(ep.value.split(":")[0])
        except Exception as e:  # a broken third-party package must not break samplerlab
            raise ConfigError(
                f"entry-point plugin '{ep.name}' ({ep.value}) failed to import: {e}; "
                f"fix or uninstall it, or set {DISABLE_ENTRY_POINTS_ENV}=1"
            ) from e
        conf = Path(module.__file__).resolve().parent / "conf"
        dist = ep.dist.name if ep.dist is not None else "?"
        found.append(ExternalConf(dist, ep.name, conf))
    return found


def available(group: str) -> dict[str, str]:
    """Every option of a config group → where it comes from ('builtin' or a distribution name)."""
    options = {p.stem: "builtin" for p in sorted((CONF_DIR / group).glob("*.yaml"))}
    for ext in entry_point_confs():
        for p in sorted((ext.path / group).glob("*.yaml")):
            options.setdefault(p.stem, ext.distribution)
    return options


CHECKED: Memo[dict[str, Any]] = Memo("checked plugin parameters", 1024)


def _checked_params(cls: type, params: dict[str, Any], where: str) -> dict[str, Any]:
    """``params`` type-checked (and converted) through ``cls``'s schema; remembered, since the merge
    costs milliseconds and the runs of a sweep build the same plugins again and again."""
    def check() -> dict[str, Any]:
        try:
            checked = OmegaConf.merge(schema(cls), params)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ConfigError(f"{where}{'.' + str(key) if key else ''}: {str(e).splitlines()[0]}") from e
        out = {k: getattr(checked, k) for k in params}
        return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in out.items()}

    return CHECKED.get((cls, repr(sorted(params.items()))), check)


def plugin_class(target: str, where: str) -> type:
    """The class ``target`` names, if it may be built from a config: a class (never a function) from
    outside the standard library that implements a samplerlab hook (``@hookimpl``) or is callable (a
    denoiser, wrapped as a model). Anything else is refused before it runs."""
    module_name, _, attr = str(target).rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}: cannot import _target_ '{target}' ({e})") from e
    stdlib = str(getattr(obj, "__module__", "")).split(".")[0] in (*sys.stdlib_module_names, "builtins")
    hooks = inspect.isclass(obj) and any(getattr(getattr(obj, n, None), f"{PROJECT}_impl", None) for n in dir(obj))
    denoiser = inspect.isclass(obj) and "__call__" in {n for k in obj.__mro__[:-1] for n in vars(k)}
    if not inspect.isclass(obj) or stdlib or not (hooks or denoiser):
        raise ConfigError(f"{where}: _target_ '{target}' is not a plugin class (a class with @hookimpl methods, or a "
                          "denoiser class): only such classes are built from a config")
    return obj


def instantiate(node: DictConfig, where: str) -> object:
    """Build a plugin from ``_target_`` (a class, see :func:`plugin_class`) and parameters,
    type-checked against its dataclass schema."""
    params = OmegaConf.to_container(node, resolve=True)
    assert isinstance(params, dict)
    target = params.pop("_target_", None)
    if not target:
        raise ConfigError(f"{where} has no _target_: give the plugin class, e.g. _target_: plugins.solver.euler.Euler")
    cls = plugin_class(str(target), where)
    attr = cls.__name__
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ConfigError(
                f"{where}: unknown parameter(s) {', '.join(unknown)}; {attr} accepts: {', '.join(sorted(names)) or 'none'}"
            )
        params = copy.deepcopy(_checked_params(cls, params, where))
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


class PluginSet:
    """The configured plugins, registered with pluggy, and each hook's implementations in config order."""

    def __init__(self, entries: list[PluginEntry], specs: ModuleType):
        self.entries = entries
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(specs)
        self._names: dict[int, str] = {}
        for i, e in enumerate(entries):
            if self.pm.is_registered(e.obj):
                raise ConfigError(f"plugin object {e.group}.{e.name} is configured twice")
            self.pm.register(e.obj, name=f"{e.group}:{e.name}:{i}")
            self._names[id(e.obj)] = e.name
        self.pm.check_pending()
        for hook in EXCLUSIVE_HOOKS:
            owners = self.implementers(hook)
            if len(owners) != 1:
                listed = ", ".join(f"{e.name} ({e.group})" for e in owners) or "none"
                raise ConfigError(
                    f"exactly one plugin must answer '{hook}', found {listed}: "
                    + ("choose one" if owners else f"add a {_ROLE[hook]} plugin")
                )
        for hook in OPTIONAL_EXCLUSIVE_HOOKS:
            owners = self.implementers(hook)
            if len(owners) > 1:
                listed = " and ".join(f"{e.group}.{e.name}" for e in owners)
                raise ConfigError(f"{listed} both answer '{hook}' (each sets the starting latents): keep one of them")

    def implementers(self, hook: str) -> list[PluginEntry]:
        plugins = {id(impl.plugin) for impl in getattr(self.pm.hook, hook).get_hookimpls()}
        return [e for e in self.entries if id(e.obj) in plugins]

    def calls(self, hook: str) -> list[tuple[str, Callable[..., Any]]]:
        """(plugin name, bound hook function) for every implementation of ``hook``, in config order."""
        return [(e.name, getattr(e.obj, hook)) for e in self.implementers(hook)]

    def one(self, hook: str) -> tuple[str, Callable[..., Any]]:
        (entry,) = self.implementers(hook)
        return entry.name, getattr(entry.obj, hook)

    def optional(self, hook: str) -> tuple[str, Callable[..., Any]] | None:
        """The one implementation of an at-most-one hook, or None."""
        found = self.calls(hook)
        return found[0] if found else None

    def name_of(self, obj: object) -> str:
        return self._names.get(id(obj), type(obj).__name__)

    def by_group(self, group: str) -> list[PluginEntry]:
        return [e for e in self.entries if e.group == group]

    def hook_map(self) -> dict[str, list[str]]:
        """Hook → plugin names in call order (for the record)."""
        out = {}
        for name in sorted(self.pm.hook.__dict__):
            if name.startswith("_"):
                continue
            names = [e.name for e in self.implementers(name) if e.group != BUILTIN]
            if names:
                out[name] = names
        return out


_ROLE = {"schedule": "schedule", "predict": "model", "step": "solver"}


def _owns_schedule(node: DictConfig | None) -> bool:
    """Whether the configured solver brings its own grid (class attribute ``owns_schedule``): the
    ``schedule`` group is then not instantiated, and the solver answers the ``schedule`` hook."""
    target = None if node is None else node.get("_target_")
    if not target:
        return False
    module_name, _, attr = str(target).rpartition(".")
    try:
        return bool(getattr(getattr(importlib.import_module(module_name), attr), "owns_schedule", False))
    except (ImportError, AttributeError):
        return False  # instantiate() reports the bad target


def build_plugins(
    cfg: DictConfig,
    choices: dict[str, str],
    specs: ModuleType,
    wrap_model: Callable[[object], object],
    model: object | None = None,
    builtins: tuple[tuple[str, object], ...] = (),
) -> PluginSet:
    """Instantiate every plugin of the composed config, in group order, and register them with the
    hook ``specs``, after the ``builtins`` ((name, plugin) pairs). ``model``, when given, replaces the
    ``model`` group; ``wrap_model`` turns a configured model object into a model adapter."""
    entries = [PluginEntry(name, BUILTIN, obj) for name, obj in builtins]
    solver_owns_grid = _owns_schedule(cfg.get("solver"))
    for group in GROUPS:
        node = cfg.get(group)
        if group == "model" and model is not None:
            entries.append(PluginEntry("custom", "model", model))
            continue
        if node is None or (group == "schedule" and solver_owns_grid):
            continue
        if group in SINGLE_GROUPS:
            name = choices.get(group) or str(node.get("_target_", group)).rsplit(".", 2)[-2]
            obj = instantiate(node, f"{group}={name}")
            entries.append(PluginEntry(name, group, wrap_model(obj) if group == "model" else obj))
        else:
            if not isinstance(node, DictConfig):
                raise ConfigError(f"'{group}' must be a list of plugin names, e.g. {group}=[a,b]")
            for name, sub in node.items():
                if not isinstance(sub, DictConfig):
                    raise ConfigError(f"{group}.{name} is not a plugin config; pick plugins with {group}=[{name}]")
                entries.append(PluginEntry(str(name), group, instantiate(sub, f"{group}.{name}")))
    return PluginSet(entries, specs)
