"""The Python entry point: ``run(overrides)`` composes the same config as the CLI and runs it.

>>> from framework.entry.api import run
>>> result = run(["model=gaussian", "solver=heun", "steps=10"])
>>> result.record["metrics"]["nfe"]
19.0
"""
from __future__ import annotations

from pathlib import Path

from framework.core.run import Result
from framework.entry.compose import compose
from framework.entry.signals import sigterm_as_interrupt
from framework.runs.execute import execute


def run(overrides: list[str] | None = None, model: object | None = None, output_dir: str | Path | None = None) -> Result:
    """Compose ``overrides`` (Hydra syntax, e.g. ``["solver=heun", "steps=10"]``) and run.

    ``model`` may be any object implementing the denoiser protocol (``__call__(x, sigma, **cond)``,
    ``sigma_min``, ``sigma_max``, ``shape``) or a model adapter; it replaces the ``model`` group.
    ``output_dir`` (or the ``output_dir`` key) makes the run write its folder there, batch by batch;
    a rerun into the same folder reads back what is already there (a finished run is returned from
    disk), unless ``resume=false`` (docs/reliability.md).

    Repeated calls are cheap: each override list is composed once per process (Hydra's composition
    costs ~60 ms) and every call gets its own deep copy of that config (~1 ms), so a run can never
    change what a later call composes; the results are identical to a cold call's. Each call
    returns a new :class:`Result`.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of strings, e.g. ['solver=heun']")
    cfg, choices = compose(list(overrides or []))
    with sigterm_as_interrupt():
        return execute(cfg, choices, model=model, output_dir=output_dir)
