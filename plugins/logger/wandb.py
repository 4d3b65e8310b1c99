"""Weights & Biases logger: one W&B run per samplerlab run, in ``project``/``entity``/``group``
(default group: the Hydra sweep folder, so one sweep = one group). Logs the resolved config, the
summary metrics, the sample grid, the per-step previews (``preview.png`` of the ``preview`` callback,
when the run has an output folder) and a ``wandb.Table`` of samples (image, prompt, seed, sample
index). With no API key and no ``WANDB_MODE`` it runs offline and says so once (files land under
``$WANDB_DIR/wandb/offline-run-*``, to ``wandb sync`` later); ``WANDB_MODE`` is respected. A server
that does not answer within ``init_timeout`` seconds (or any failure to start online) sends this run
and every later one of the process (a sweep) offline, said in one line, once. A W&B failure is a
warning: the run and its local record always complete."""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from framework.plugin import ConfigError, grid, hookimpl, to_pil


@dataclass
class _Process:
    """What the process remembers across its runs (a sweep's jobs): said once, tried once."""

    said_offline: bool = False
    offline_because: str | None = None  # why online W&B failed; later runs go offline at once


PROCESS = _Process()


def _mode() -> str | None:
    """The W&B mode to use: the user's WANDB_MODE, else offline when no API key is configured or
    when an earlier run of this process could not reach the server."""
    if PROCESS.offline_because is not None:
        return "offline"
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc")):
        return None
    if not PROCESS.said_offline:
        print("samplerlab: no W&B API key found: logging offline (sync later with `wandb sync`)")
        PROCESS.said_offline = True
    return "offline"


def _went_offline(error: Exception, timeout: float) -> None:
    first = (str(error).splitlines() or [""])[0]
    PROCESS.offline_because = f"{type(error).__name__}: {first}"
    print(f"samplerlab: warning: W&B could not start online within {timeout:g} s ({PROCESS.offline_because}): "
          "logging offline for the rest of this process (sync later with `wandb sync`)", file=sys.stderr)


@dataclass
class _Log:
    """A run's W&B run (None when off or failed) and its sample rows (in the run's stash)."""

    wandb_run: Any = None
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class WandbLogger:
    project: str = "samplerlab"
    entity: str | None = None
    group: str | None = None
    log_images: bool = True
    init_timeout: float = 15.0  # seconds to wait for the server before going offline

    def __post_init__(self) -> None:
        if not self.init_timeout > 0:
            raise ConfigError(f"logger.wandb.init_timeout must be > 0 seconds, got {self.init_timeout}")

    def _safe(self, log: _Log, what: str, fn, *args: Any) -> None:
        try:
            fn(log, *args)
        except Exception as e:  # W&B must never kill a run
            warnings.warn(f"W&B {what} failed ({type(e).__name__}: {e}); the local record is still written", stacklevel=2)
            log.wandb_run = None

    @hookimpl
    def run_start(self, run):
        self._safe(run.stash.get(self, _Log), "init", self._init, run)

    def _init(self, log: _Log, run) -> None:
        import wandb
        from omegaconf import OmegaConf

        group = self.group or (str(run.output_dir.parent) if run.output_dir is not None else None)
        args = dict(project=self.project, entity=self.entity, group=group, reinit="create_new",
                    config=OmegaConf.to_container(run.cfg, resolve=True), dir=os.environ.get("WANDB_DIR"))
        mode = _mode()
        if mode is None:  # online unless WANDB_MODE says otherwise: a short timeout, then offline
            try:  # quiet: W&B's "logged in as" line asks the server who we are, with a timeout of its own
                log.wandb_run = wandb.init(**args, settings=wandb.Settings(init_timeout=self.init_timeout, quiet=True))
                if getattr(log.wandb_run, "url", None):
                    print(f"samplerlab: W&B run {log.wandb_run.url}")
                return
            except Exception as e:
                _went_offline(e, self.init_timeout)
        log.wandb_run = wandb.init(**args, mode="offline")

    @hookimpl
    def batch_end(self, run, batch, latents, images):
        log = run.stash.get(self, _Log)
        if log.wandb_run is None or images is None or not self.log_images:
            return
        prompts = batch.cond.prompts if batch.cond is not None else [""] * len(batch.indices)
        for k, img, prompt in zip(batch.indices, images, prompts):
            log.rows.append([k, run.settings.seed, prompt, img.detach().float().cpu()])

    @hookimpl
    def run_end(self, run, result):
        log = run.stash.get(self, _Log)
        if log.wandb_run is not None:
            self._safe(log, "log", self._finish, run, result)

    def _finish(self, log: _Log, run, result) -> None:
        import wandb

        w = log.wandb_run
        w.summary.update(dict(run.metrics))
        preview = run.output_dir / "preview.png" if run.output_dir is not None else None
        if preview is not None and preview.is_file():  # written by the preview callback's run_end (earlier group)
            w.log({"preview": wandb.Image(str(preview), caption="predicted x0 per step (columns) per sample (rows)")})
        if log.rows:
            table = wandb.Table(columns=["sample", "seed", "prompt", "image"])
            for k, seed, prompt, img in log.rows:
                table.add_data(k, seed, prompt, wandb.Image(to_pil(img)))
            w.log({"samples": table, "grid": wandb.Image(to_pil(grid(result.images)))})
        w.finish()
