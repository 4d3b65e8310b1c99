"""Plugin packages made visible as installed distributions without pip.

samplerlab finds third-party plugins through the entry-point group ``samplerlab``
(``framework.core.registry.entry_point_confs``), and ``importlib.metadata`` finds entry points in
any ``<name>-<version>.dist-info`` folder on ``sys.path`` holding a ``METADATA`` and an
``entry_points.txt``. So a temporary dist-info folder on ``sys.path`` is, for discovery, the same as
``pip install`` — in milliseconds instead of seconds, with nothing left behind. One real
``pip install`` stays, as a slow test (tests/testing/test_plugin_kit.py).
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

GROUP = "samplerlab"


def write_dist_info(site: Path, name: str, version: str, entry_points: Mapping[str, Mapping[str, str]]) -> Path:
    """Write ``site/<name>-<version>.dist-info`` with METADATA and entry_points.txt
    (``entry_points``: group → {entry-point name → object reference})."""
    folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, points in entry_points.items():
        lines += [f"[{group}]", *(f"{k} = {v}" for k, v in points.items()), ""]
    (folder / "entry_points.txt").write_text("\n".join(lines))
    return folder


@contextlib.contextmanager
def on_path(*paths: Path, packages: tuple[str, ...] = ()) -> Iterator[None]:
    """``paths`` first on ``sys.path`` within the block; afterwards the ``packages`` imported from
    them are forgotten (``sys.modules``), so another test may install a package of the same name."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            for p in reversed(paths):
                mp.syspath_prepend(str(p))  # also invalidates the import caches
            yield
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] in packages]:
            del sys.modules[name]
        importlib.invalidate_caches()


@contextlib.contextmanager
def installed_in_place(project: Path, site: Path) -> Iterator[None]:
    """The plugin project at ``project`` (a folder with a pyproject.toml), as ``pip install -e``
    would leave it for discovery: its dist-info (name, version and entry points read from the
    pyproject) in ``site``, and ``project`` itself on ``sys.path``."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    points = meta.get("entry-points", {})
    if GROUP not in points:
        raise AssertionError(f"{project / 'pyproject.toml'} declares no [project.entry-points.{GROUP}]")
    write_dist_info(site, meta["name"], meta["version"], points)
    packages = tuple(sorted({v.split(":")[0].split(".")[0] for v in points[GROUP].values()}))
    with on_path(site, project, packages=packages):
        yield


def plugin_sources(group: str) -> dict[str, str]:
    """Every option of a config group → where it comes from ('builtin' or a distribution name), as
    ``samplerlab-plugins`` lists them. (The one place these tests read the registry directly.)"""
    from framework.core.registry import available

    return available(group)
