"""Command-line entry points: ``samplerlab`` (the Hydra app) and ``samplerlab-plugins``.

``samplerlab [overrides] [-m]`` — e.g. ``samplerlab model=gaussian solver=heun steps=10`` or
``samplerlab -m solver=euler,heun steps=5,10,20``; ``samplerlab --help`` is samplerlab's own page
(:mod:`framework.entry.help`). Configuration errors print one line naming the fix and exit with
code 2, leaving no run folder behind; every job of a sweep is composed and its plugins built before
the first starts. A sweep job that fails at run time is recorded as failed (``failed.json`` in its
folder) and the sweep goes on; it ends with a table of its runs and exits with 1 if any failed.
Ctrl-C or SIGTERM stop a run between two writes (exit 130 / 143); rerunning the same command with
``name=`` (or the same ``hydra.run.dir``/``hydra.sweep.dir``) resumes it.

Fast start: this module imports neither torch nor any plugin; ``--help`` answers before Hydra is
imported and a configuration error before torch is (``benchmarks/cli_start.py`` measures both).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from framework.core.errors import ConfigError, SamplerlabError
from framework.core.registry import CONF_DIR

LOG = logging.getLogger("samplerlab")
#: The most jobs of a sweep composed one by one before it starts; a larger sweep has each of its
#: values checked once instead (with the other keys at their first value).
MAX_CHECKED_JOBS = 256
#: Where the CLI's run folders live (below the working directory); emptied parents are removed up to them.
OUTPUT_ROOTS = ("outputs", "multirun")

#: Hydra flags that take a value.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                "--config-dir", "-cd", "--experimental-rerun"}


def _split(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(overrides, whether Hydra runs the job) from a command line."""
    overrides, runs, skip = [], True, False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _VALUE_FLAGS:
            skip = True
            runs = runs and a not in ("--cfg", "-c")
            continue
        if a.startswith("-"):
            runs = runs and a not in ("--help", "-h", "--hydra-help", "--info", "--version", "--shell-completion", "-sc")
            continue
        overrides.append(a)
    return overrides, runs


def _variants(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (the rest at their first value): each is composed once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    base, sweeps = [], []
    for text, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            if not isinstance(ov.value(), ChoiceSweep):
                continue  # ranges/intervals are for sweepers (optuna); Hydra checks them
            values = [f"{ov.get_key_element()}={v}" for v in ov.sweep_string_iterator()]
            sweeps.append((len(base), values))
            base.append(values[0])
        else:
            base.append(text)
    out = [base]
    for pos, values in sweeps:
        out += [base[:pos] + [v] + base[pos + 1 :] for v in values[1:]]
    return out


def sweep_jobs(overrides: list[str]) -> list[list[str]] | None:
    """Every job of a sweep as Hydra's basic sweeper runs them (its override lists, in order), or
    None when the sweep cannot be listed (intervals for a tuning sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from framework.entry.compose import explain

    try:
        parsed = OverridesParser.create().parse_overrides(task_overrides(overrides))
    except HydraException as e:
        raise explain(e) from e
    if any(ov.is_sweep_override() and not ov.is_discrete_sweep() for ov in parsed):
        return None
    return BasicSweeper.split_arguments(parsed, None)[0]


def task_overrides(overrides: list[str]) -> list[str]:
    """The overrides of the job's own config (Hydra keeps ``hydra.*`` and ``hydra/*`` apart)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def check_plugins(cfg, choices: dict[str, str]) -> None:
    """Build every configured plugin except the model (which would load weights): parameter types
    and values are checked as the run will check them."""
    from omegaconf import DictConfig

    from framework.core.registry import GROUPS, SINGLE_GROUPS, instantiate

    for group in GROUPS:
        node = cfg.get(group)
        if group == "model" or not isinstance(node, DictConfig):
            continue
        items = [(f"{group}={choices.get(group, '?')}", node)] if group in SINGLE_GROUPS else \
            [(f"{group}.{name}", sub) for name, sub in node.items()]
        for where, sub in items:
            try:
                instantiate(sub, where)
            except SamplerlabError:
                raise
            except Exception as e:  # a plugin's own check that raised something else
                raise ConfigError(f"{where}: {type(e).__name__}: {e}") from e


def precheck(overrides: list[str], multirun: bool = False) -> list[list[str]] | None:
    """Compose the command, type-check its top-level keys and build its plugins (but the model)
    before Hydra starts, so that a mistake is one line and leaves no folder; for a sweep, every job
    (up to :data:`MAX_CHECKED_JOBS`, else every value). Returns the sweep's jobs (None for a single
    run, or a sweep that cannot be listed). Torch and the plugins are imported only once the
    composition and the settings have passed."""
    from framework.core.settings import read_settings
    from framework.entry.compose import compose

    if not multirun:
        cfg, choices = compose(overrides)
        read_settings(cfg)
        check_plugins(cfg, choices)
        return None
    jobs = sweep_jobs(overrides)
    checked = jobs if jobs is not None and len(jobs) <= MAX_CHECKED_JOBS else _variants(task_overrides(overrides))
    own = [o for o in overrides if o not in task_overrides(overrides)]
    for k, job in enumerate(checked):
        try:
            cfg, choices = compose([*job, *own])
            read_settings(cfg)
            check_plugins(cfg, choices)
        except SamplerlabError as e:
            which = f"job {k} ({' '.join(job)})" if checked is jobs else f"the sweep ({' '.join(job)})"
            raise ConfigError(f"{which}: {e}; no job was started") from e
    return jobs


def _error(e: BaseException | str) -> int:
    print(f"samplerlab: error: {e}", file=sys.stderr)
    return 2


#: What Hydra writes into a job folder before the job runs (removed again when the job fails to start).
_HYDRA_FILES = (".hydra", "samplerlab.log")


def _remove_empty_parents(folder: Path) -> None:
    """Remove the folders above ``folder`` left empty, up to and including outputs/ or multirun/
    in the working directory (a dated folder made for a run that failed)."""
    try:
        rel = folder.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return
    if len(rel.parts) < 2 or rel.parts[0] not in OUTPUT_ROOTS:
        return
    parent = folder.resolve().parent
    for _ in range(len(rel.parts) - 1):
        try:
            parent.rmdir()  # only when empty
        except OSError:
            return
        parent = parent.parent


def discard_if_unused(folder: Path) -> None:
    """Remove a run folder that holds nothing but Hydra's own files (a job that failed to start),
    and the dated folders above it that it leaves empty."""
    if not folder.is_dir() or any(p.name not in _HYDRA_FILES for p in folder.iterdir()):
        return
    for name in _HYDRA_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    try:
        folder.rmdir()
    except OSError:
        return
    _remove_empty_parents(folder)


def _objective(cfg, metrics: dict) -> float | None:
    """The metric a sweeper (optuna) minimises, named by the ``objective`` key."""
    name = cfg.get("objective")
    if not name:
        return None
    if name not in metrics:
        raise SystemExit(_error(ConfigError(
            f"objective '{name}' is not among this run's metrics ({', '.join(sorted(metrics))}): "
            f"add its metrics plugin, e.g. metrics=[{name}]")))
    return float(metrics[name])


def _job_failed(cfg, folder: Path, job: str, e: BaseException) -> float | None:
    """A sweep job that failed: one line, the error in its folder; the sweep goes on."""
    from framework.core.files import atomic_write_json
    from framework.entry.summary import FAILED

    text = str(e) if isinstance(e, SamplerlabError) else f"{type(e).__name__}: {e}"
    print(f"samplerlab: error: job {job} failed: {text}", file=sys.stderr)
    LOG.error("job %s failed: %s", job, text)
    if folder.is_dir():
        atomic_write_json(folder / FAILED, {"error": text})
    return float("nan") if cfg.get("objective") else None


def _app(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from framework.entry.signals import sigterm_as_interrupt
    from framework.entry.summary import FAILED, run_line
    from framework.runs.execute import execute

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if isinstance(v, str)}
    folder = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    (folder / FAILED).unlink(missing_ok=True)  # an earlier attempt's failure
    try:
        with sigterm_as_interrupt():
            result = execute(cfg, choices, output_dir=folder)
    except KeyboardInterrupt:
        discard_if_unused(folder)
        raise
    except Exception as e:
        if sweep:
            return _job_failed(cfg, folder, f"{hc.job.num} ({' '.join(hc.overrides.task)})", e)
        discard_if_unused(folder)
        if isinstance(e, SamplerlabError):
            raise SystemExit(_error(e)) from None
        raise
    line = run_line(result, folder)
    print(line)
    LOG.info(line.removeprefix("samplerlab: "))
    for k, why in list(result.failures.items())[:3]:
        print(f"samplerlab: warning: sample {k} failed: {why}", file=sys.stderr)
        LOG.warning("sample %s failed: %s", k, why)
    return _objective(cfg, result.record["metrics"])


def list_entry_points() -> None:
    """One line on stderr naming the entry-point plugin distributions in use (none: nothing)."""
    from framework.core.registry import DISABLE_ENTRY_POINTS_ENV, entry_point_confs

    externals = entry_point_confs()
    if externals:
        names = ", ".join(f"{x.distribution} ({x.entry_point})" for x in externals)
        print(f"samplerlab: entry-point plugins: {names}; disable with {DISABLE_ENTRY_POINTS_ENV}=1", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Hydra app in-process on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in argv):
        from framework.entry.help import help_text

        print(help_text())
        return 0
    from framework.entry.quiet import quiet_libraries

    with quiet_libraries():
        return _main(argv)


def _main(argv: list[str]) -> int:
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from framework.entry.compose import explain, register_resolvers, release, searchpath_override
    from framework.entry.summary import SweepFolder, sweep_table

    overrides, runs = _split(argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        jobs = None
        if runs:
            list_entry_points()
            jobs = precheck(overrides, multirun)
        extra = searchpath_override()
    except SamplerlabError as e:
        return _error(e)
    register_resolvers()
    release()
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_app)
    saved, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["samplerlab", *argv, *extra]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach this function, which words them
    SweepFolder.last.clear()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra configures logging for its jobs; restored after
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 2 if code == 1 else code
    except KeyboardInterrupt as e:
        return 128 + getattr(e, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM
    except OSError as e:  # an output folder that cannot be made or written
        where = f" '{e.filename}'" if e.filename else ""
        return _error(f"cannot write{where}: {e.strerror or e}; choose a writable folder (e.g. hydra.run.dir=... "
                      "or run from a writable working directory)")
    except (HydraException, OmegaConfBaseException) as e:
        return _error(explain(e, overrides))
    finally:
        sys.argv = saved
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    if multirun and runs and SweepFolder.last:
        text, failed = sweep_table(SweepFolder.last[0], jobs)
        print(text)
        return 1 if failed else 0
    return 0


def plugins_main(argv: Sequence[str] | None = None) -> int:
    """``samplerlab-plugins``: every plugin per family, with its description, options and source."""
    from framework.entry.help import plugin_listing

    try:
        print(plugin_listing())
    except SamplerlabError as e:
        return _error(e)
    return 0


def run() -> None:  # console-script shim
    raise SystemExit(main())


def run_plugins() -> None:  # console-script shim
    raise SystemExit(plugins_main())
