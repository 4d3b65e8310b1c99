"""One composed config, end to end: a run folder, the engine over every batch, the record.

A reader's path: settings (:mod:`framework.core.settings`) → the run folder, finished or resumed
(:mod:`framework.runs.folder`) → the engine opens the run and samples each batch
(:mod:`framework.core.engine`) → the model decodes → the folder saves the batch → metrics and
``run_end`` → the record (:mod:`framework.runs.records`).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from framework.core import background, engine
from framework.core.finite import failures
from framework.core.run import Result, Run
from framework.core.state import Batch
from framework.core.settings import read_settings
from framework.metrics.exact_error import ExactError
from framework.models.base import wrap_model
from framework.runs import records
from framework.runs.folder import RunFolder
from framework.runs.progress import Progress


def execute(
    cfg: DictConfig,
    choices: dict[str, str] | None = None,
    model: object | None = None,
    output_dir: str | Path | None = None,
) -> Result:
    """Run one composed config: build plugins, sample every batch, score, record.

    With a run folder (``output_dir``, or the ``output_dir`` key) every batch is saved as soon as it
    is made. With ``resume`` on (the default), a rerun into the same folder reads back the batches
    saved under the same run key instead of generating them, and a finished run is returned from
    disk without building anything. A ``model`` object passed in (which the run key cannot see)
    turns resuming off.
    """
    settings = read_settings(cfg)
    out = output_dir if output_dir is not None else settings.output_dir
    folder = RunFolder(Path(out), records.run_key(records.resolved_config(cfg))) if out else None
    with folder.locked() if folder is not None else contextlib.nullcontext():  # one process per folder
        return _execute(cfg, choices or {}, model, folder, settings.resume and model is None)


def _execute(cfg: DictConfig, choices: dict[str, str], model: object | None, folder: RunFolder | None,
             resume: bool) -> Result:
    settings = read_settings(cfg)
    if folder is not None and resume:
        done = folder.finished()
        if done is not None:
            return done
    progress = Progress()
    run = engine.open_run(cfg, choices, wrap_model, None if model is None else wrap_model(model),
                          builtins=(("progress", progress), ("exact_error", ExactError())))
    run.output_dir = folder.path if folder is not None else None
    if folder is not None:  # the run could start: now the folder becomes this run's alone
        folder.prepare(resume, settings.save_images)
    indices = settings.indices()
    batches = [list(indices[s : s + settings.batch_size]) for s in range(0, len(indices), settings.batch_size)]
    made: list[Made] = []
    t0 = time.perf_counter()
    try:
        with torch.no_grad():  # gradients only inside the guidance calls that asked (core.step.Denoiser)
            for ks in batches:
                made.append(_batch(run, ks, folder, resume))
                b = made[-1]
                engine.end_batch(run, b.batch, b.latents, b.images)
            background.drain(run)  # the last batches' files and metric updates (core.background)
    except KeyboardInterrupt:
        background.close(run)  # the batches made so far are saved whole
        where = (f"{sum(len(b.batch.indices) for b in made)} samples saved in {folder.path}: rerun the same command "
                 "to resume" if folder is not None else "no run folder")
        print(f"samplerlab: interrupted after {len(made)} of {len(batches)} batches; {where}", file=sys.stderr)
        raise
    finally:
        background.close(run)
        progress.close(run)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0

    failed = {k: why for b in made for k, why in b.failures.items()}
    sampled = sum(len(b.batch.indices) for b in made if not b.batch.resumed)  # by this attempt
    run.metrics.update(nfe=sum(b.batch.nfe for b in made) / len(made),
                       unet_calls=sum(b.batch.unet_calls for b in made) / len(made),
                       seconds=seconds, seconds_per_sample=seconds / (sampled or len(indices)))
    known = [b.batch for b in made if b.batch.network_inputs >= 0]  # batch files older than issue 23 lack the count
    if known:  # network inputs per sample, and NFE in the CFG-pair convention (record's nfe_convention)
        inputs = sum(b.network_inputs for b in known) / len(known)
        run.metrics.update(network_inputs=inputs, nfe_pairs=inputs / 2)
    result = Result(x_T=torch.cat([b.x_T for b in made]), latents=torch.cat([b.x for b in made]),
                    images=None if made[0].images is None else torch.cat([b.images for b in made]),
                    record={}, schedule=run.schedule, failed=list(failed), indices=list(indices),
                    resumed=[k for b in made if b.batch.resumed for k in b.batch.indices], failures=failed)
    engine.close_run(run, result)
    result.record = records.build(run, result)
    if folder is not None:
        folder.save(result, save_images=settings.save_images)
    else:
        records.seal(result.record)
    return result


@dataclass
class Made:
    """One batch, sampled (or read back), decoded and saved."""

    batch: Batch
    x_T: torch.Tensor
    x: torch.Tensor  # at the grid's last σ
    latents: torch.Tensor  # what the model decodes
    images: torch.Tensor | None
    failures: dict[int, str]


def _batch(run: Run, ks: list[int], folder: RunFolder | None, resume: bool) -> Made:
    """Sample (or read back) one batch, decode it and save it."""
    batch = engine.new_batch(run, ks)
    saved = folder.load_batch(ks, tuple(run.model.latent_shape)) if folder is not None and resume else None
    if saved is None:
        x_T, x = engine.sample_batch(run, batch)
        bad = failures(batch)
    else:
        x_T, x = saved.x_T.to(run.device, run.dtype), saved.latents.to(run.device, run.dtype)
        batch.nfe, batch.unet_calls, bad, batch.resumed = saved.nfe, saved.unet_calls, saved.failures, True
        batch.network_inputs = -1 if saved.network_inputs is None else saved.network_inputs  # −1: not recorded
        batch.failed = torch.tensor([k in bad for k in ks], device=run.device)
    batch.failure = list(bad.values())
    latents = run.model.output_latents(x, run.schedule.sigmas[-1])
    images = run.model.decode(latents)
    if images is not None:  # the adjust_images chain (inpainting's paste-back) before anything sees them
        images = engine.adjust_images(run, batch, images)
    pngs = images if run.settings.save_images else None
    if folder is not None:  # written on the run's worker while the next batch samples (core.background)
        pixels = background.host_copy(None if pngs is None else quantize(pngs))
        if saved is None:
            x_T_h, x_h = background.host_copy(x_T), background.host_copy(x)
            background.background(run).submit(
                lambda: folder.save_batch(ks, x_T_h.get(), x_h.get(), None if pixels is None else pixels.get(), bad,
                                          batch.nfe, batch.unet_calls, network_inputs=batch.network_inputs))
        elif pixels is not None:  # resumed: PNGs missing or damaged since
            background.background(run).submit(lambda: folder.restore_samples(saved, pixels.get()))
    return Made(batch, x_T, x, latents, images, bad)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit values their PNGs hold (on their device: 4× less to copy)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
