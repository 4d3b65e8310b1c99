"""A plugin from a separately installed distribution (a temporary *.dist-info on sys.path) is found
through the entry-point group 'samplerlab' and usable from the CLI."""
from __future__ import annotations

import json
import textwrap

import pytest

from framework.entry.cli import main, plugins_main
from tests.distributions import on_path, write_dist_info

DISABLE_ENTRY_POINTS_ENV = "SAMPLERLAB_DISABLE_ENTRY_POINTS"  # README: turns entry-point plugins off


@pytest.fixture
def installed_plugin(tmp_path):
    site = tmp_path / "site"
    pkg = site / "midpoint_plugin"
    (pkg / "conf" / "solver").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "midpoint.py").write_text(textwrap.dedent('''
        """The explicit midpoint method (a second-order Runge–Kutta method)."""
        from dataclasses import dataclass
        from framework.plugin import hookimpl

        @dataclass
        class Midpoint:
            @hookimpl
            def step(self, state, denoise):
                s, s_next = state.sigma, state.sigma_next
                if s_next == 0:
                    return state.x + (s_next - s) * state.pred.derivative
                s_mid = (s * s_next) ** 0.5
                x_mid = state.x + (s_mid - s) * state.pred.derivative
                return state.x + (s_next - s) * denoise(x_mid, s_mid).derivative
    '''))
    (pkg / "conf" / "solver" / "midpoint.yaml").write_text("_target_: midpoint_plugin.midpoint.Midpoint\n")
    write_dist_info(site, "midpoint-plugin", "0.1", {"samplerlab": {"midpoint": "midpoint_plugin"}})
    with on_path(site, packages=("midpoint_plugin",)):
        yield site


def test_entry_point_plugin_runs_from_cli(installed_plugin, tmp_path, capsys):
    code = main(["model=gaussian", "solver=midpoint", "steps=4", f"hydra.run.dir={tmp_path}/run"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["plugins"]["step"] == ["midpoint"]
    assert rec["metrics"]["nfe"] == 7


def test_entry_point_plugin_in_sweep_beside_builtins(installed_plugin, tmp_path, capsys):
    code = main(["-m", "model=gaussian", "solver=midpoint,heun", "steps=4", f"hydra.sweep.dir={tmp_path}/sw"])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "sw").glob("*/record.json"))) == 2


def test_entry_point_plugin_listed_with_source(installed_plugin, capsys):
    plugins_main([])
    out = capsys.readouterr().out
    assert "midpoint" in out and "midpoint-plugin" in out


def test_entry_points_disabled_by_environment(installed_plugin, monkeypatch, capsys):
    monkeypatch.setenv(DISABLE_ENTRY_POINTS_ENV, "1")
    assert main(["model=gaussian", "solver=midpoint"]) == 2
    assert "unknown solver 'midpoint'" in capsys.readouterr().err
