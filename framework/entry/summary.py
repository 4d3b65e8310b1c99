"""What the CLI prints when a run or a sweep ends: one line per run naming every metric and the grid,
and for a sweep a table of its runs (done, found finished, failed) and how to build its report.

A sweep job that fails leaves :data:`FAILED` in its folder (the error, one line): the sweep goes on,
and the table and the exit code report it. A later success of the same job removes the file.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

#: The file a failed sweep job leaves in its folder.
FAILED = "failed.json"
#: Metrics left out of the compact line (the line states the seconds itself).
_NOT_SHOWN = ("seconds",)
#: Rows a sweep table shows (the report shows every run).
MAX_ROWS = 60


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:g}" if float(value).is_integer() else f"{value:.4g}"


def metrics_text(metrics: dict[str, Any]) -> str:
    """Every metric, compactly: ``nfe 20, unet_calls 40, fid 12.35``."""
    return ", ".join(f"{k} {number(v)}" for k, v in metrics.items() if k not in _NOT_SHOWN)


def run_line(result: Any, folder: Path) -> str:
    """The line a finished run prints: samples, time, every metric, and where the images are."""
    m = result.record["metrics"]
    grid = folder / "grid.png"
    where = f"{grid}" if grid.exists() else f"{folder}"
    if result.skipped:
        head = f"finished run found (run key {result.record['run_key']}), nothing to do"
    else:
        head = f"{len(result.indices)} samples in {m['seconds']:.2f} s"
        if result.failed:
            head += f", {len(result.failed)} failed"
        if result.resumed:
            head += f", {len(result.resumed)} read back from an earlier attempt"
    return f"samplerlab: {head}; {metrics_text(m)} -> {where}"


def _overrides(folder: Path) -> list[str] | None:
    try:
        data = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(x) for x in data] if isinstance(data, list) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _job_folders(sweep: Path, jobs: Sequence[Sequence[str]] | None) -> list[tuple[Path, list[str]]]:
    """This sweep's job folders with their overrides, in job order: those whose overrides are one
    of ``jobs`` (a named sweep's folder also holds earlier sweeps' runs), or every job folder."""
    found = [(p, o) for p in sorted(sweep.iterdir()) if p.is_dir() and (o := _overrides(p)) is not None] \
        if sweep.is_dir() else []
    if jobs is None:
        return sorted(found, key=lambda f: (not f[0].name.isdigit(), int(f[0].name) if f[0].name.isdigit() else 0, f[0].name))
    order = {frozenset(j): i for i, j in enumerate(jobs)}

    def job_of(path: Path, overrides: list[str]) -> int | None:  # a numbered folder is that job's
        k = order.get(frozenset(overrides))
        return k if k is not None and (not path.name.isdigit() or int(path.name) == k) else None

    mine = [(k, p, o) for p, o in found if (k := job_of(p, o)) is not None]
    return [(p, o) for _, p, o in sorted(mine, key=lambda t: (t[0], t[1].name))]


def sweep_table(sweep: Path, jobs: Sequence[Sequence[str]] | None = None) -> tuple[str, int]:
    """The table of a sweep's runs and the number of failed ones."""
    folders = _job_folders(sweep, jobs)
    rows, errors, metric_names = [], [], []
    for path, overrides in folders:
        record, failed = _read_json(path / "record.json"), _read_json(path / FAILED)
        metrics = (record or {}).get("metrics") or {}
        status = "done" if record else "failed" if failed else "incomplete"
        if failed and not record:
            errors.append(f"  {path.name}: {failed.get('error', '?')}")
        metric_names += [k for k in metrics if k not in metric_names and k not in _NOT_SHOWN]
        rows.append((path.name, overrides, status, metrics))
    varying = [k for k in dict.fromkeys(o.split("=", 1)[0] for _, ovs, _, _ in rows for o in ovs)
               if len({next((o for o in ovs if o.split("=", 1)[0] == k), "") for _, ovs, _, _ in rows}) > 1]
    header = ["folder", *varying, "status", *metric_names]
    table = [header]
    for name, ovs, status, metrics in rows[:MAX_ROWS]:
        values = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in ovs if "=" in o}
        table.append([name, *(values.get(k, "") for k in varying), status,
                      *(number(metrics[k]) if k in metrics else "-" for k in metric_names)])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    n_failed = sum(1 for r in rows if r[2] != "done")
    counts = f"{sum(1 for r in rows if r[2] == 'done')} done" + (f", {n_failed} failed or incomplete" if n_failed else "")
    out = [f"samplerlab: sweep of {len(rows)} runs in {sweep} ({counts}):", *lines]
    if len(rows) > MAX_ROWS:
        out.append(f"  … and {len(rows) - MAX_ROWS} more (the report lists them all)")
    if errors:
        out += ["failed:", *errors]
    out.append(f"report: samplerlab-report {sweep}")
    return "\n".join(out), n_failed


class SweepFolder(Callback):
    """A Hydra callback (conf/config.yaml ``hydra.callbacks``): notes the folder of the sweep this
    process launched, so that the CLI can print its table when the sweep ends (any launcher)."""

    #: The folder of the last sweep launched in this process (the CLI reads and clears it).
    last: list[Path] = []

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        SweepFolder.last[:] = [Path(str(config.hydra.sweep.dir))]
