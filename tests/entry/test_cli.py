"""The CLI, in-process through main(argv); one subprocess smoke test."""
from __future__ import annotations

import json
import os
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
    assert f"samplerlab: sweep of 4 runs in {tmp_path} (4 done):" in out and f"samplerlab-report {tmp_path}" in out


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
        (["model=gaussian", "schedule=simple"], "schedule=simple: needs a discrete-time model"),  # the preset the user typed
        # near misses name the closest keys; a key no setting or plugin reads is refused, with or without +
        (["stepz=10"], "unknown key 'stepz': no setting or plugin reads it; did you mean steps?"),
        (["+stepz=10"], "unknown key 'stepz': no setting or plugin reads it; did you mean steps?"),
        (["model=gaussian", "solver=ddim", "solver.etaa=1"], "did you mean solver.eta? (solver=ddim takes: eta)"),
        (["model=gaussian", "solver.eta=1"], "'eta' is a parameter of solver=ddim"),
        (["model=gaussian", "momentum=[heavy_ball]", "momentum.heavy_ball.betaa=0.3"], "did you mean momentum.heavy_ball.beta?"),
        (["model=gaussian", "momentum.heavy_ball.beta=0.3"], "select the plugin first, e.g. momentum=[heavy_ball]"),
        # config names are plain names; absurd or non-finite values are refused up front (issue 27 item 10)
        (["schedule=/etc/passwd"], "schedule '/etc/passwd' is not a plugin name"),
        (["model=../config"], "model '../config' is not a plugin name"),
        (["solver=../solver/heun"], "solver '../solver/heun' is not a plugin name"),
        (["model=gaussian", "name=."], "name '.' must be a relative folder name"),
        (["model=gaussian", "cfg_scale=nan"], "cfg_scale must be a finite number, got nan"),
        (["model=gaussian", "steps=100000000"], "steps=100000000 is more than any sampler needs"),
        (["model=gaussian", "num_samples=100000000"], "split it with shard_count="),
        (["model=gaussian", "device=mps"], "device=mps but MPS"),
        (["model=gaussian", "device=gpu"], "unknown device 'gpu'"),
        (["solver=euler,heun"], "is a sweep: add -m"),
        (["model=gaussian", "+solver.foo=1"], "unknown parameter(s) foo"),
        (["model=gaussian", "momentum=[heavy_ball]", "momentum.heavy_ball.beta=1.5"], "beta must be in [0, 1)"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, expected, tmp_path):
    code, out, err = cli(capsys, *argv, f"hydra.run.dir={tmp_path}/r")
    assert code == 2
    line = one_line_error(err)
    assert expected in line
    assert not (tmp_path / "r").exists()  # no folder left behind


def test_unknown_plugin_lists_available(capsys):
    code, out, err = cli(capsys, "solver=nope")
    assert "euler" in err and "heun" in err and "ddim" in err


def test_plugins_listing(capsys):
    """Each plugin with its one-line description (its module docstring's first line) and its
    options with the preset's defaults."""
    assert plugins_main([]) == 0
    out = capsys.readouterr().out
    assert "solver (one: solver=name):" in out and "momentum (a list: momentum=[a,b]):" in out and "builtin" in out
    lines = out.splitlines()
    heun = next(l for l in lines if l.split()[:1] == ["heun"])
    assert heun.split()[1] == "builtin" and "Heun's second-order method (Karras et al. 2022, Algorithm 1)" in heun
    ddim = lines.index(next(l for l in lines if l.split()[:1] == ["ddim"]))
    assert "eta=0.0" in lines[ddim + 1]
    heavy = lines.index(next(l for l in lines if l.split()[:1] == ["heavy_ball"]))
    assert "beta=" in lines[heavy + 1] and "lookahead=false" in lines[heavy + 1]


@pytest.mark.parametrize("argv", [
    ["model=gaussian", "+model.nope=1"],  # reaches the model: an error at run time, after Hydra made the folder
    ["model=sd15", "model.path=./no/such/folder"],
])
def test_failed_run_leaves_no_folder(capsys, tmp_path, monkeypatch, argv):
    """A run that fails after Hydra made its folder leaves neither it nor an empty outputs/<date>/."""
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["name=study"]):
        code, out, err = cli(capsys, *argv, *extra)
        assert code == 2, err
        one_line_error(err)
        assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))


def test_unwritable_output_folder_is_one_line(capsys, tmp_path):
    """An output folder that cannot be made (PermissionError; a file in the way) is one line, exit 2."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    targets = [blocker / "run"]
    try:
        Path("/sys/samplerlab-cannot-write").mkdir()
    except PermissionError:
        targets.append(Path("/sys/samplerlab-cannot-write/run"))  # Linux: EPERM even for root
    except OSError:
        pass
    for target in targets:
        code, out, err = cli(capsys, "model=gaussian", f"hydra.run.dir={target}")
        assert code == 2
        assert "cannot write" in one_line_error(err)


def test_subprocess_smoke(tmp_path):
    """The installed console script runs the default job end to end (the one subprocess test), in an
    environment without the test suite's quieting variables: its stderr holds no third-party output
    (diffusers' loading bar, transformers' or accelerate's notices), and its stdout one line."""
    from framework.entry.quiet import QUIET_ENV

    exe = Path(sys.executable).with_name("samplerlab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from framework.entry.cli import run; run()"]
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    out = subprocess.run(cmd + ["steps=2", "num_samples=2", "batch_size=2", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "record.json").exists()
    for noise in ("diffusers", "transformers", "accelerate", "Loading pipeline", "it/s", "Warning", "torchvision"):
        assert noise not in out.stderr, out.stderr
    assert [l for l in out.stderr.splitlines() if not l.startswith("samplerlab: ")] == [], out.stderr
    assert len(out.stdout.splitlines()) == 1 and "grid.png" in out.stdout
