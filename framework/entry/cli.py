"""Command-line entry points: ``samplerlab`` (the Hydra app) and ``samplerlab-plugins``.

``samplerlab [overrides] [-m]`` — e.g. ``samplerlab model=gaussian solver=heun steps=10`` or
``samplerlab -m solver=euler,heun steps=5,10,20``. Configuration errors print one line naming the
fix and exit with code 2 (Hydra's own errors exit 1; the wrapper maps them to 2), leaving no run
folder behind. Ctrl-C or SIGTERM stop a run between two writes (exit 130 / 143); rerunning the same
command with ``name=`` (or the same ``hydra.run.dir``/``hydra.sweep.dir``) resumes it.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from framework.core.errors import SamplerlabError
from framework.core.registry import CONF_DIR

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


def precheck(overrides: list[str]) -> None:
    """Compose every sweep value and type-check the top-level keys before Hydra starts any job."""
    from hydra.errors import HydraException

    from framework.entry.compose import compose, explain
    from framework.core.settings import read_settings

    try:
        variants = _variants(overrides)
    except HydraException as e:
        raise explain(e) from e
    for variant in variants:
        cfg, _ = compose(variant)
        read_settings(cfg)


def _error(e: BaseException) -> int:
    print(f"samplerlab: error: {e}", file=sys.stderr)
    return 2


#: What Hydra writes into a job folder before the job runs (removed again when the job fails to start).
_HYDRA_FILES = (".hydra", "samplerlab.log")


def discard_if_unused(folder: Path) -> None:
    """Remove a run folder that holds nothing but Hydra's own files (a job that failed to start)."""
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
        pass


def _objective(cfg, metrics: dict) -> float | None:
    """The metric a sweeper (optuna) minimises, named by the ``objective`` key."""
    from framework.core.errors import ConfigError

    name = cfg.get("objective")
    if not name:
        return None
    if name not in metrics:
        raise SystemExit(_error(ConfigError(
            f"objective '{name}' is not among this run's metrics ({', '.join(sorted(metrics))}): "
            f"add its metrics plugin, e.g. metrics=[{name}]")))
    return float(metrics[name])


def _app(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from framework.entry.signals import sigterm_as_interrupt
    from framework.runs.execute import execute

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if isinstance(v, str)}
    folder = Path(hc.runtime.output_dir)
    try:
        with sigterm_as_interrupt():
            result = execute(cfg, choices, output_dir=folder)
    except SamplerlabError as e:
        discard_if_unused(folder)
        raise SystemExit(_error(e)) from None
    except KeyboardInterrupt:
        discard_if_unused(folder)
        raise
    m = result.record["metrics"]
    if result.skipped:
        print(f"samplerlab: finished run found (run key {result.record['run_key']}), nothing to do -> {folder}")
        return _objective(cfg, m)
    failed = f", {len(result.failed)} failed" if result.failed else ""
    extra = f", rmse_to_reference {m['rmse_to_reference']:.3g}" if "rmse_to_reference" in m else ""
    resumed = f", {len(result.resumed)} read back from an earlier attempt" if result.resumed else ""
    print(
        f"samplerlab: {len(result.indices)} samples, nfe {m['nfe']:g}, "
        f"{m['seconds']:.2f} s{extra}{failed}{resumed} -> {folder}"
    )
    for k, why in list(result.failures.items())[:3]:
        print(f"samplerlab: warning: sample {k} failed: {why}", file=sys.stderr)
    return _objective(cfg, m)


def _quiet_libraries() -> None:
    """Keep third-party chatter (optional-dependency notices) out of the app's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars; sampling keeps its own


def list_entry_points() -> None:
    """One line on stderr naming the entry-point plugin distributions in use (none: nothing)."""
    from framework.core.registry import DISABLE_ENTRY_POINTS_ENV, entry_point_confs

    externals = entry_point_confs()
    if externals:
        names = ", ".join(f"{x.distribution} ({x.entry_point})" for x in externals)
        print(f"samplerlab: entry-point plugins: {names}; disable with {DISABLE_ENTRY_POINTS_ENV}=1", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Hydra app in-process on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    _quiet_libraries()
    import hydra

    from framework.entry.compose import register_resolvers, release, searchpath_override

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, runs = _split(argv)
    try:
        if runs:
            list_entry_points()
            precheck(overrides)
        extra = searchpath_override()
    except SamplerlabError as e:
        return _error(e)
    register_resolvers()
    release()
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_app)
    saved = sys.argv
    sys.argv = ["samplerlab", *argv, *extra]
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 2 if code == 1 else code
    except KeyboardInterrupt as e:
        return 128 + getattr(e, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        sys.argv = saved
    return 0


def plugins_main(argv: Sequence[str] | None = None) -> int:
    """``samplerlab-plugins``: every plugin per family, with where it comes from."""
    from framework.core.registry import GROUPS, available, entry_point_confs

    try:
        externals = entry_point_confs()
    except SamplerlabError as e:
        return _error(e)
    for group in GROUPS:
        options = available(group)
        print(f"{group}:")
        for name, source in options.items():
            print(f"  {name:<24} {source}")
        if not options:
            print("  (none)")
    if externals:
        print("entry-point distributions: " + ", ".join(f"{x.distribution} ({x.entry_point})" for x in externals))
    return 0


def run() -> None:  # console-script shim
    raise SystemExit(main())


def run_plugins() -> None:  # console-script shim
    raise SystemExit(plugins_main())
