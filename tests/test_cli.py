"""The CLI, in-process through main(argv); one subprocess smoke test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from framework.entry.cli import main, plugins_main


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_single_run_writes_record(capsys, tmp_path):
    code, out, err = cli(capsys, "model=gaussian", "solver=heun", "steps=10", f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["metrics"]["nfe"] == 19
    assert "rmse_to_reference" in rec["metrics"]
    assert "nfe 19" in out


def test_image_run_writes_pngs_and_grid(capsys, tmp_path, tiny_dir):
    code, out, err = cli(capsys, "model=sd15", f"model.path={tiny_dir}", "steps=2", "num_samples=2",
                         f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["images"]["samples"] == ["samples/000000.png", "samples/000001.png"]
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert all((tmp_path / p).exists() for p in rec["images"]["samples"])


def test_multirun_sweep(capsys, tmp_path):
    code, out, err = cli(capsys, "-m", "model=gaussian", "solver=euler,heun", "steps=2,4",
                         f"hydra.sweep.dir={tmp_path}")
    assert code == 0, err
    records = sorted(tmp_path.glob("*/record.json"))
    assert len(records) == 4
    seen = {(r["config"]["solver"]["_target_"].rsplit(".", 1)[-1], r["config"]["steps"]) for r in map(lambda p: json.loads(p.read_text()), records)}
    assert seen == {("Euler", 2), ("Euler", 4), ("Heun", 2), ("Heun", 4)}


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["solver=nope"], "unknown solver 'nope': choose one of"),
        (["model=gaussian", "steps=0"], "steps must be ≥ 1"),
        (["model=gaussian", "prompts=a cat"], "it must be a list"),
        (["stepz=3"], "unknown key 'stepz'"),
        (["model=gaussian", "solver.eta=1"], "unknown key 'solver.eta'"),
        (["model=sd15"], "is not available offline"),
        (["model=gaussian", "momentum=[heavy_ball]", "solver=heun"], "does not compose with solver=heun"),
        (["model=gaussian", "+guidance.second._target_=plugins.solver.heun.Heun"], "exactly one plugin must answer 'step'"),
        (["-m", "model=gaussian", "solver=euler,nope"], "unknown solver 'nope'"),
        (["model=gaussian", "schedule.rho=abc"], "schedule=karras.rho: Value 'abc' of type 'str' could not be converted to Float"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, expected, tmp_path):
    code, out, err = cli(capsys, *argv, f"hydra.run.dir={tmp_path}/r")
    assert code == 2
    line = one_line_error(err)
    assert expected in line
    assert not (tmp_path / "r" / "record.json").exists()


def test_unknown_plugin_lists_available(capsys):
    code, out, err = cli(capsys, "solver=nope")
    assert "euler" in err and "heun" in err and "ddim" in err


def test_plugins_listing(capsys):
    assert plugins_main([]) == 0
    out = capsys.readouterr().out
    assert "solver:" in out and "heun" in out and "builtin" in out


def test_subprocess_smoke(tmp_path):
    """The installed console script runs end to end (the one subprocess test)."""
    exe = Path(sys.executable).with_name("samplerlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from framework.entry.cli import run; run()"]
    out = subprocess.run(cmd + ["model=gaussian", "steps=3", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "record.json").exists()
