"""Weights & Biases logger: one W&B run per samplerlab run, in ``project``/``entity``/``group``
(default group: the Hydra sweep folder, so one sweep = one group). Logs the resolved config, the
summary metrics, the sample grid, the per-step previews (``preview.png`` of the ``preview`` callback,
when the run has an output folder) and a ``wandb.Table`` of samples (image, prompt, seed, sample
index). With no API key and no ``WANDB_MODE`` it runs offline and says so once (files land under
``$WANDB_DIR/wandb/offline-run-*``, to ``wandb sync`` later); ``WANDB_MODE`` is respected. A W&B
failure is a warning: the run and its local record always complete."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from framework.plugin import grid, hookimpl, to_pil

_said_offline = False


def _mode() -> str | None:
    """The W&B mode to use: the user's WANDB_MODE, else offline when no API key is configured."""
    global _said_offline
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc")):
        return None
    if not _said_offline:
        print("samplerlab: no W&B API key found: logging offline (sync later with `wandb sync`)")
        _said_offline = True
    return "offline"


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
        log.wandb_run = wandb.init(
            project=self.project, entity=self.entity, group=group, mode=_mode(), reinit="create_new",
            config=OmegaConf.to_container(run.cfg, resolve=True), dir=os.environ.get("WANDB_DIR"),
        )

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
