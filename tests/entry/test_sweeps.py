"""Sweep presets: Hydra launchers (basic, joblib, submitit) and optuna sweepers under conf/hydra/,
found through the app's config folder; sweeps under each launcher leave records a report reads."""
from __future__ import annotations

import json

import pytest

from framework.tools import report
from framework.entry.cli import main
from framework.core.registry import CONF_DIR


def hydra_node(overrides):
    from hydra import compose, initialize_config_dir

    from framework.entry.compose import release

    release()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    release()
    return cfg.hydra


@pytest.mark.parametrize("preset, target, keys", [
    ("local_joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": 2}),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
     {"gpus_per_node": 1, "tasks_per_node": 1, "array_parallelism": 32}),
    ("local_submitit", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", {"gpus_per_node": 0}),
])
def test_launcher_presets_compose(preset, target, keys):
    launcher = hydra_node([f"hydra/launcher={preset}"]).launcher
    assert launcher._target_ == target
    assert {k: launcher[k] for k in keys} == keys


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "hydra" / "sweeper").glob("*.yaml")))
def test_optuna_sweeper_presets_compose(preset):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweeper = hydra_node([f"hydra/sweeper={preset}"]).sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.params and all(str(v).startswith("interval(") for v in sweeper.params.values())


def test_objective_names_a_metric_of_the_run(tmp_path, capsys):
    """``objective=<metric>`` makes the app return that metric (what sweepers minimise); a metric
    the run does not compute is one clear error."""
    import framework.entry.cli as cli
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from framework.core.registry import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["model=gaussian", "objective=nfe"])
    assert cli._objective(cfg, {"nfe": 4.0, "seconds": 0.1}) == 4.0
    cfg.objective = "fid"
    with pytest.raises(SystemExit) as e:
        cli._objective(cfg, {"nfe": 4.0})
    assert e.value.code == 2 and "metrics=[fid]" in capsys.readouterr().err


def test_optuna_preset_tunes_karras_rho_and_churn(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "tune"
    assert main(["-m", "hydra/sweeper=tune_karras_churn", "hydra.sweeper.n_trials=3", "model=gaussian",
                 "callback=[nan_guard,churn]", "objective=rmse_to_reference", "steps=4", "num_samples=8",
                 f"hydra.sweep.dir={sweep}"]) == 0
    results = (sweep / "optimization_results.yaml").read_text()
    assert "schedule.rho" in results and "callback.churn.s_churn" in results and "best_value" in results
    records = [json.loads((sweep / str(k) / "record.json").read_text()) for k in range(3)]
    assert len({r["config"]["schedule"]["rho"] for r in records}) == 3  # three trials, three rho values


def _sweep_and_report(launcher_args, overrides, sweep):
    assert main(["-m", *launcher_args, *overrides, f"hydra.sweep.dir={sweep}"]) == 0
    assert report.main([str(sweep), "--no-wandb"]) == 0
    return (sweep / "report.html").read_text()


@pytest.mark.slow
def test_three_by_three_sweep_under_joblib_yields_a_report(tiny_overrides, tmp_path):
    page = _sweep_and_report(
        ["hydra/launcher=local_joblib"],
        [*tiny_overrides, "solver=euler,heun,dpmpp_2m", "steps=1,2,3", "num_samples=2", "batch_size=2",
         "metrics=[fid]", "metrics.fid.reference=8", f"metrics.fid.cache_dir={tmp_path / 'cache'}"],
        tmp_path / "sweep")
    assert page.count('class="sample"') == 9 and 'data-metric="fid"' in page


@pytest.mark.slow
def test_sweep_under_submitit_local_yields_a_report(tmp_path):
    page = _sweep_and_report(["hydra/launcher=local_submitit"],
                             ["model=gaussian", "solver=euler,heun", "steps=2,4"], tmp_path / "sweep")
    assert 'data-metric="rmse_to_reference"' in page and page.count("<tr>") >= 5


def test_sweep_checks_every_job_before_the_first_starts(tmp_path, capsys):
    """An invalid plugin parameter value in any job stops the sweep before job 0 (issue 27 item 7)."""
    sweep = tmp_path / "sweep"
    code = main(["-m", "model=gaussian", "momentum=[heavy_ball]", "momentum.heavy_ball.beta=0.5,1.5,0.2", "steps=5,10",
                 f"hydra.sweep.dir={sweep}"])
    err = capsys.readouterr().err
    assert code == 2 and not sweep.exists()
    (line,) = err.strip().splitlines()
    assert line.startswith("samplerlab: error: job 2 (") and "momentum.heavy_ball.beta=1.5" in line
    assert "beta must be in [0, 1)" in line and "no job was started" in line


def test_sweep_goes_on_after_a_failed_job(tmp_path, capsys):
    """A job that fails at run time is recorded as failed, the other jobs run, and the sweep ends
    with a table of its runs, where to build the report, and exit code 1."""
    sweep = tmp_path / "sweep"
    code = main(["-m", "model=gaussian", "solver=heun,euler", "momentum=[heavy_ball]", "steps=2,3",
                 f"hydra.sweep.dir={sweep}"])
    out, err = capsys.readouterr()
    assert code == 1
    assert sorted(p.parent.name for p in sweep.glob("*/record.json")) == ["2", "3"]  # the euler jobs
    for job in ("0", "1"):
        failure = json.loads((sweep / job / "failed.json").read_text())
        assert "does not compose with solver=heun" in failure["error"]
    assert err.count("samplerlab: error: job ") == 2
    table = out[out.index("samplerlab: sweep of 4 runs"):].splitlines()
    assert table[0] == f"samplerlab: sweep of 4 runs in {sweep} (2 done, 2 failed or incomplete):"
    assert table[1].split()[:4] == ["folder", "solver", "steps", "status"] and "rmse_to_reference" in table[1]
    assert [row.split()[:4] for row in table[2:6]] == [
        ["0", "heun", "2", "failed"], ["1", "heun", "3", "failed"], ["2", "euler", "2", "done"], ["3", "euler", "3", "done"]]
    assert table[-1] == f"report: samplerlab-report {sweep}"
    # the same sweep again, the failing value dropped: the finished runs are found, the table lists
    # this sweep's runs only, and the exit code is 0
    assert main(["-m", "model=gaussian", "solver=euler", "momentum=[heavy_ball]", "steps=2,3",
                 f"hydra.sweep.dir={sweep}"]) == 0
    assert "samplerlab: sweep of 2 runs" in capsys.readouterr().out
