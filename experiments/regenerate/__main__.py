"""Every doc figure, table and committed result computed from the shipped weights, rebuilt in
dependency order after the weights change (a new bundled model, guide or flow model).

    python -m experiments.regenerate list=true               # the plan: each job, its needs, state, minutes
    python -m experiments.regenerate                         # run every job not yet done, 2 at a time
    python -m experiments.regenerate 'only=[gallery,loop]'   # just these (again, if done)

The jobs are shell commands in config.yaml (the studies' own documented commands), run from the
repository root with one torch thread each (OMP_NUM_THREADS=1, passive OpenMP waiting: two jobs share
the 2-core machine without spin-waiting). A job's output goes to ``<runs>/<job>.log``; when it exits
0, ``<runs>/<job>.done.json`` records its command and seconds. ``runs`` defaults to
``outputs/regenerate/<weights fingerprint>``: after the weights change every job runs again, while an
interrupted regeneration resumes — done jobs are skipped, and the studies that resume from their run
folder (``{runs}`` in a command: ``<runs>/<job>``) pick up where they stopped. A failed job holds back
the jobs that need it; the others go on; the exit status is 1 if any failed. What a job leaves to a
person (figures quoted in prose, tables pasted into a doc) is printed when it is done (``then``).

Not here: retraining the weights themselves (the model cards' "Rebuild"), speed benchmarks (they need
an idle machine: docs/performance.md), and the golden run folder of tests/data (its README).
Commit the new weights first: the momentum study writes their git commit into its table.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from experiments.harness import Experiment, entry
from framework.core.files import atomic_write_json
from framework.plugin import ConfigError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def plan(jobs: dict, only: list[str]) -> list[str]:
    """Job names in start-priority order, checked: every need a job of the list, no cycles."""
    for name, job in jobs.items():
        for need in job.get("needs") or []:
            if need not in jobs:
                raise ConfigError(f"job {name!r} needs {need!r}, which is not a job: fix config.yaml's jobs")
    unknown = [n for n in only if n not in jobs]
    if unknown:
        raise ConfigError(f"only={unknown}: not jobs; the jobs are {', '.join(jobs)}")
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ConfigError(f"jobs need each other in a cycle: {' -> '.join(path + (name,))}")
        if name not in seen:
            for need in jobs[name].get("needs") or []:
                visit(need, path + (name,))
            seen.add(name)

    for name in jobs:
        visit(name, ())
    return list(only) if only else list(jobs)


def uncommitted_weights() -> str:
    """``git status`` lines of framework/bundled/weights (empty when committed or not a git checkout)."""
    try:
        res = subprocess.run(["git", "status", "--porcelain", "framework/bundled/weights"], cwd=ROOT,
                             capture_output=True, text=True)
    except OSError:  # no git
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def fill(text: str, root: Path, name: str) -> str:
    """A job's command or note with ``{runs}`` (its own folder) and ``{root}`` (the regeneration's) filled in."""
    return text.replace("{runs}", str(root / name)).replace("{root}", str(root))


def run_jobs(jobs: dict, pending: list[str], done: set[str], root: Path, parallel: int) -> tuple[dict, list]:
    """Run ``pending`` (start-priority order), ``parallel`` at a time, each once its needs are in
    ``done``; returns ({job: seconds} of those that exited 0, [those that failed or were held back])."""
    pending, done = list(pending), set(done) - set(pending)  # a job run again is not done until it is
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[str] = []
    finished: dict[str, float] = {}
    print(f"{len(pending)} jobs, ≈{sum(jobs[n].get('minutes', 0) for n in pending)} one-thread minutes, "
          f"{parallel} at a time; logs in {root}", flush=True)
    try:
        while pending or running:
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                seconds = round(time.time() - t0, 1)
                if proc.returncode == 0:
                    done.add(name)
                    finished[name] = seconds
                    atomic_write_json(root / f"{name}.done.json", {"command": proc.args, "seconds": seconds})
                    note = f"\n    then: {fill(jobs[name]['then'], root, name)}" if jobs[name].get("then") else ""
                    print(f"{time.strftime('%H:%M')} done {name} in {seconds / 60:.1f} min "
                          f"({len(finished)} of {len(finished) + len(pending) + len(running)}){note}", flush=True)
                else:
                    failed.append(name)
                    print(f"{time.strftime('%H:%M')} FAILED {name} (exit {proc.returncode}): see {root / name}.log", flush=True)
            for name in [n for n in pending if any(need in failed for need in jobs[n].get("needs") or [])]:
                pending.remove(name)
                failed.append(name)
                print(f"held back {name}: a job it needs failed", flush=True)
            for name in [n for n in pending if all(need in done for need in jobs[n].get("needs") or [])]:
                if len(running) >= parallel:
                    break
                pending.remove(name)
                command = fill(jobs[name]["run"], root, name)
                print(f"{time.strftime('%H:%M')} start {name} (≈{jobs[name].get('minutes', '?')} min)", flush=True)
                with open(root / f"{name}.log", "w") as log:
                    running[name] = (subprocess.Popen(command, shell=True, cwd=ROOT, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True), time.time())
            if running:
                time.sleep(1)
    finally:  # interrupted (Ctrl-C, kill): no job left running unwatched; it resumes on the next call
        for proc, _ in running.values():
            os.killpg(proc.pid, signal.SIGTERM)  # the job's shell and what it started
    return finished, failed


def main(argv: list[str] | None = None) -> dict:
    ex = Experiment.compose(HERE, argv)
    cfg = ex.cfg
    jobs = OmegaConf.to_container(cfg.jobs, resolve=True)
    todo = plan(jobs, list(cfg.only))
    if cfg.runs is None:
        from framework.runs.records import weights_fingerprint

        cfg.runs = f"outputs/regenerate/{weights_fingerprint({})['bundled']}"
    root = Path(cfg.runs)
    done = {n for n in jobs if (root / f"{n}.done.json").is_file()}
    pending = [n for n in todo if cfg.only or n not in done]
    if cfg.list:
        for n in jobs:
            state = "done" if n in done else ("to run" if n in pending else "skipped")
            print(f"{n:24s} {state:8s} ≈{jobs[n].get('minutes', '?'):>3} min  needs {jobs[n].get('needs') or '-'}")
        print(f"{len(pending)} to run, ≈{sum(jobs[n].get('minutes', 0) for n in pending)} one-thread minutes; runs: {root}")
        return {"pending": pending}
    blocked = [n for n in pending for need in jobs[n].get("needs") or [] if need not in done and need not in pending]
    if blocked:
        raise ConfigError(f"{blocked} need jobs that are neither done nor in only=: add them to only=")
    dirty = uncommitted_weights()
    if dirty:
        raise ConfigError(f"the weights are not committed ({dirty.splitlines()[0]} …): commit them first, so that "
                          "every figure names the weights it was made from")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the running jobs too
    finished, failed = run_jobs(jobs, pending, done, root, cfg.parallel)
    results = {"finished_seconds": finished, "failed": failed}
    ex.record(root / "record.json", results)
    if failed:
        print(f"failed or held back: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    entry(main)
