"""experiments.regenerate: the plan of every weights-dependent doc job, and its runner (order, failures, resume)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.regenerate.__main__ import HERE, main, plan, run_jobs
from framework.plugin import ConfigError

ROOT = HERE.parents[1]


def test_every_job_calls_a_study_config_or_script_of_the_repository():
    jobs = OmegaConf.to_container(OmegaConf.load(HERE / "config.yaml").jobs)
    assert plan(jobs, []) == list(jobs)  # needs are jobs, no cycles
    for name, job in jobs.items():
        assert set(re.findall(r"\{(\w+)\}", job["run"])) <= {"runs", "root"}, name
        for module, config in re.findall(r"python -m ([\w.]+)(?: --config-name (\w+))?", job["run"]):
            assert importlib.util.find_spec(module) is not None, (name, module)
            if config:
                assert (ROOT / module.replace(".", "/") / f"{config}.yaml").is_file(), (name, config)
        for script in re.findall(r"python ([\w/]+\.py)", job["run"]):
            assert (ROOT / script).is_file(), (name, script)


def test_plan_rejects_unknown_needs_cycles_and_names():
    with pytest.raises(ConfigError, match="'b', which is not a job"):
        plan({"a": {"run": "true", "needs": ["b"]}}, [])
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        plan({"a": {"run": "true", "needs": ["b"]}, "b": {"run": "true", "needs": ["a"]}}, [])
    with pytest.raises(ConfigError, match="only=\\['c'\\]: not jobs; the jobs are a"):
        plan({"a": {"run": "true"}}, ["c"])


def test_run_jobs_waits_for_needs_holds_back_after_a_failure_and_marks_what_is_done(tmp_path):
    jobs = {"late": {"run": "sleep 0.5; echo late >> {root}/order.txt", "needs": ["first"]},
            "first": {"run": "mkdir -p {runs} && echo first >> {root}/order.txt", "then": "look at {runs}"},
            "bad": {"run": "echo broken; exit 3"},
            "after_bad": {"run": "echo never >> {root}/order.txt", "needs": ["bad"]}}
    finished, failed = run_jobs(jobs, list(jobs), set(), tmp_path, parallel=2)
    assert set(finished) == {"first", "late"} and sorted(failed) == ["after_bad", "bad"]
    assert (tmp_path / "order.txt").read_text().split() == ["first", "late"]
    assert (tmp_path / "first").is_dir()  # {runs} is the job's own folder
    assert "broken" in (tmp_path / "bad.log").read_text()
    assert json.loads((tmp_path / "first.done.json").read_text())["seconds"] >= 0
    assert not (tmp_path / "bad.done.json").exists()


def test_list_shows_what_a_rerun_would_do(tmp_path, capsys):
    (tmp_path / "gallery.done.json").write_text("{}")
    res = main(["list=true", f"runs={tmp_path}"])
    assert "gallery" not in res["pending"] and "loop" in res["pending"]
    assert re.search(r"gallery\s+done", capsys.readouterr().out)
    assert main(["list=true", f"runs={tmp_path}", "only=[gallery]"])["pending"] == ["gallery"]  # only= runs it again
    with pytest.raises(ConfigError, match="neither done nor in only="):
        main([f"runs={tmp_path}", "only=[guidance]"])  # its need guidance_defaults is not done


def test_an_interrupted_run_stops_its_jobs_and_marks_nothing(tmp_path, monkeypatch):
    import os
    import time

    import experiments.regenerate.__main__ as regen

    def interrupt(_seconds):
        while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text().strip():
            time.monotonic()  # the job has started its child
        raise KeyboardInterrupt

    jobs = {"slow": {"run": "sleep 30 & echo $! > {root}/pid; wait"}}  # a shell with a child, as `a && b` jobs are
    monkeypatch.setattr(regen.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, ["slow"], set(), tmp_path, parallel=1)
    monkeypatch.undo()
    child = int((tmp_path / "pid").read_text())
    for _ in range(100):  # the orphaned child is reaped by init once killed
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the job's child outlived the interrupted run")
    assert not (tmp_path / "slow.done.json").exists()
