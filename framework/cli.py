"""Command-line entry points: ``samplerlab`` (the Hydra app) and ``samplerlab-plugins``.

``samplerlab [overrides] [-m]`` — e.g. ``samplerlab model=gaussian solver=heun steps=10`` or
``samplerlab -m solver=euler,heun steps=5,10,20``. Configuration errors print one line naming the
fix and exit with code 2 (Hydra's own errors exit 1; the wrapper maps them to 2).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from framework.errors import SamplerlabError
from framework.registry import CONF_DIR

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

    from framework.compose import compose, explain
    from framework.engine import read_settings

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


def _app(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from framework.engine import execute

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if isinstance(v, str)}
    try:
        result = execute(cfg, choices, output_dir=hc.runtime.output_dir)
    except SamplerlabError as e:
        raise SystemExit(_error(e)) from None
    m = result.record["metrics"]
    failed = f", {len(result.failed)} failed" if result.failed else ""
    extra = f", rmse_to_reference {m['rmse_to_reference']:.3g}" if "rmse_to_reference" in m else ""
    print(
        f"samplerlab: {result.record['config'].get('num_samples')} samples, nfe {m['nfe']:g}, "
        f"{m['seconds']:.2f} s{extra}{failed} -> {hc.runtime.output_dir}"
    )


def _quiet_libraries() -> None:
    """Keep third-party chatter (optional-dependency notices) out of the app's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # loading bars; sampling keeps its own


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Hydra app in-process on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    _quiet_libraries()
    import hydra

    from framework.compose import release, searchpath_override

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, runs = _split(argv)
    try:
        if runs:
            precheck(overrides)
        extra = searchpath_override()
    except SamplerlabError as e:
        return _error(e)
    release()
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_app)
    saved = sys.argv
    sys.argv = ["samplerlab", *argv, *extra]
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 2 if code == 1 else code
    finally:
        sys.argv = saved
    return 0


def plugins_main(argv: Sequence[str] | None = None) -> int:
    """``samplerlab-plugins``: every plugin per family, with where it comes from."""
    from framework.registry import GROUPS, available, entry_point_confs

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
